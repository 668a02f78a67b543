//! The tables `repro` and `replay` print: one column per policy, one row
//! per figure, each row a label and a function of a policy's report.

/// One cell of a table, computed from a policy's report.
pub type Cell<R> = Box<dyn Fn(&R) -> String>;

/// Prints one column per policy: a header of policy names, then each row's
/// label and its cell for every report.
pub fn print_columns<R>(
    policies: impl Iterator<Item = String>,
    reports: &[R],
    rows: &[(&str, Cell<R>)],
) {
    print!("{:<22}", "");
    for p in policies {
        print!("{p:>16}");
    }
    println!();
    print_rows(reports, rows);
}

/// Each row's label and its cell for every report.
pub fn print_rows<R>(reports: &[R], rows: &[(&str, Cell<R>)]) {
    for (name, f) in rows {
        print!("{name:<22}");
        for r in reports {
            print!("{:>16}", f(r));
        }
        println!();
    }
}

/// "yes" or "NO", for rows that should say yes.
pub fn yes_no(b: bool) -> String {
    if b { "yes" } else { "NO" }.to_string()
}
