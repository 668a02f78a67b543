//! The reader and writer against each other and against hand-made and
//! hostile pickles.

use super::*;
use crate::pyvalue::PyValue;

fn sample() -> PyValue {
    PyValue::dict([
        ("none", PyValue::None),
        ("t", PyValue::Bool(true)),
        ("f", PyValue::Bool(false)),
        (
            "ints",
            PyValue::list(
                [
                    0i128,
                    1,
                    255,
                    256,
                    65535,
                    65536,
                    -1,
                    -129,
                    i32::MIN.into(),
                    i32::MAX.into(),
                    1 << 31,
                    -(1 << 31) - 1,
                    0x7f3a_2c00_0000,
                    u64::MAX.into(),
                    i64::MIN.into(),
                    i128::MAX,
                    i128::MIN,
                ]
                .into_iter()
                .map(PyValue::int)
                .collect(),
            ),
        ),
        ("float", PyValue::Float(-2.5e-3)),
        ("long string", PyValue::str(&"x".repeat(300))),
        ("unicode", PyValue::str("µs → ✓")),
        ("bytes", PyValue::Bytes(vec![0u8, 1, 255].into())),
        (
            "tuples",
            PyValue::list(vec![
                PyValue::tuple(vec![]),
                PyValue::tuple(vec![PyValue::int(1)]),
                PyValue::tuple(vec![PyValue::int(0), PyValue::int(0)]),
                PyValue::tuple(vec![PyValue::int(1), PyValue::int(2), PyValue::int(3)]),
                PyValue::tuple((0..5).map(PyValue::int).collect()),
            ]),
        ),
        (
            "big list",
            PyValue::list(
                (0..2500)
                    .map(|i| {
                        PyValue::dict([("action", PyValue::str("alloc")), ("i", PyValue::int(i))])
                    })
                    .collect(),
            ),
        ),
        ("one", PyValue::list(vec![PyValue::str("alloc")])),
    ])
}

#[test]
fn round_trip() {
    let v = sample();
    let bytes = to_vec(&v);
    assert_eq!(&bytes[..2], &[0x80, 4]);
    assert_eq!(read(&bytes).unwrap(), v);
}

#[test]
fn memo_shares_and_sees_later_mutation() {
    // [L, L] where L is memoized empty and filled afterwards:
    // PROTO 2, EMPTY_LIST, BINPUT 0, MARK, EMPTY_LIST, BINPUT 1,
    // BININT1 7, APPEND, BINGET 1, APPENDS, STOP
    let data = [
        0x80, 2, b']', b'q', 0, b'(', b']', b'q', 1, b'K', 7, b'a', b'h', 1, b'e', b'.',
    ];
    let v = read(&data).unwrap();
    let inner = PyValue::list(vec![PyValue::int(7)]);
    assert_eq!(v, PyValue::list(vec![inner.clone(), inner]));
}

#[test]
fn protocol_2_dict() {
    // Python 3: pickle.dumps({'a': 1, 'b': (2, 3)}, protocol=2)
    let data = [
        0x80, 0x02, 0x7d, 0x71, 0x00, 0x28, 0x58, 0x01, 0x00, 0x00, 0x00, 0x61, 0x71, 0x01, 0x4b,
        0x01, 0x58, 0x01, 0x00, 0x00, 0x00, 0x62, 0x71, 0x02, 0x4b, 0x02, 0x4b, 0x03, 0x86, 0x71,
        0x03, 0x75, 0x2e,
    ];
    let v = read(&data).unwrap();
    assert_eq!(v.get("a"), Some(&PyValue::int(1)));
    assert_eq!(
        v.get("b"),
        Some(&PyValue::tuple(vec![PyValue::int(2), PyValue::int(3)]))
    );
}

fn err(data: &[u8]) -> PickleError {
    read(data).expect_err("refused")
}

#[test]
fn hostile_input_is_refused_with_its_offset() {
    // GLOBAL 'os\nsystem\n' at byte 2.
    let e = err(b"\x80\x02cos\nsystem\n.");
    assert_eq!(e.offset, 2);
    assert!(e.message.contains("GLOBAL"), "{e}");
    // STACK_GLOBAL, then REDUCE.
    let e = err(b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93.");
    assert_eq!(e.offset, 16);
    assert!(e.message.contains("STACK_GLOBAL"), "{e}");
    let e = err(b"\x80\x02N)R.");
    assert!(e.message.contains("REDUCE") && e.offset == 4, "{e}");
    for (byte, name) in [
        (b'b', "BUILD"),
        (b'i', "INST"),
        (b'o', "OBJ"),
        (0x81, "NEWOBJ"),
        (b'P', "PERSID"),
        (b'Q', "BINPERSID"),
    ] {
        let e = err(&[0x80, 2, b'N', byte, b'.']);
        assert_eq!(e.offset, 3);
        assert!(e.message.contains(name), "{e}");
    }
    let e = err(&[0x80, 2, 0xfe]);
    assert!(e.message.contains("unknown opcode 0xfe"), "{e}");
}

#[test]
fn truncation_and_huge_lengths_are_errors() {
    let good = to_vec(&sample());
    for cut in [1, 2, 3, good.len() / 2, good.len() - 1] {
        let e = err(&good[..cut]);
        assert!(e.message.contains("truncated"), "cut {cut}: {e}");
        assert!(e.offset <= cut, "cut {cut}: {e}");
    }
    // BINUNICODE claiming 4 GiB.
    let e = err(b"\x80\x04X\xff\xff\xff\xffab.");
    assert_eq!(e.offset, 2);
    assert!(e.message.contains("4294967295 bytes"), "{e}");
    // BINBYTES8 and FRAME claiming 2^63.
    let e = err(b"\x80\x04\x8e\x00\x00\x00\x00\x00\x00\x00\x80.");
    assert!(e.message.contains("past the end"), "{e}");
    let e = err(b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x80.");
    assert!(e.message.contains("FRAME"), "{e}");
    // LONG4 of 2^31 - 1 bytes.
    let e = err(b"\x80\x04\x8b\xff\xff\xff\x7f.");
    assert!(e.message.contains("past the end"), "{e}");
}

#[test]
fn malformed_structure_is_an_error() {
    // Not a pickle at all.
    assert_eq!(err(b"{\"a\": 1}").offset, 0);
    // Protocol 6.
    assert!(err(b"\x80\x06N.").message.contains("protocol 6"));
    // APPEND into a dict, SETITEMS into a list.
    assert!(err(b"\x80\x02}Na.").message.contains("APPEND into a dict"));
    assert!(err(b"\x80\x02](NNu.")
        .message
        .contains("SETITEMS into a list"));
    // APPENDS with no MARK, BINGET of nothing, STOP on an empty stack.
    assert!(err(b"\x80\x02]e.").message.contains("without a MARK"));
    assert!(err(b"\x80\x02h\x05.").message.contains("never stored"));
    assert!(err(b"\x80\x02.").message.contains("empty stack"));
    // A list inside itself.
    assert!(err(b"\x80\x02]q\x00h\x00a.").message.contains("cycle"));
    // A list as a dict key.
    assert!(err(b"\x80\x02}]Ns.").message.contains("unhashable"));
    // Nesting past the limit.
    let mut deep = vec![0x80, 2];
    deep.extend(std::iter::repeat_n(b']', MAX_DEPTH + 5));
    deep.extend(std::iter::repeat_n(b'a', MAX_DEPTH + 4));
    deep.push(b'.');
    assert!(err(&deep).message.contains("nested"), "{}", err(&deep));
    // Invalid UTF-8.
    assert!(err(b"\x80\x04\x8c\x01\xff.").message.contains("UTF-8"));
}
