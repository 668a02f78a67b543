//! Python pickles of plain data, read and written without Python.
//!
//! [`read`] is a small interpreter of the opcodes that plain data needs
//! (protocols 2 to 5: dicts, lists, tuples, str, bytes, int, float, bool,
//! None, and the memo that shares them). A pickle is untrusted input:
//! every opcode that would import or call code (GLOBAL, STACK_GLOBAL,
//! REDUCE, BUILD, INST, OBJ, NEWOBJ, PERSID, …) is refused with its name
//! and byte offset, nothing runs, and every length is checked against the
//! bytes left, so memory stays proportional to the file.
//!
//! [`write`] writes protocol 4 with only the opcodes PyTorch's memory
//! viewer (`MemoryViz.js`) reads: no frames, no bytes opcodes, containers
//! filled in batches of 1000, repeated strings memoized.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Write};
use std::sync::Arc;

use crate::pyvalue::PyValue;

/// Containers nested deeper than this are refused.
pub const MAX_DEPTH: usize = 200;

/// A pickle that cannot be read: where, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct PickleError {
    /// Byte offset of the opcode at fault (or of the end, if truncated).
    pub offset: usize,
    pub message: String,
}

impl fmt::Display for PickleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "byte {}: {}", self.offset, self.message)
    }
}

impl std::error::Error for PickleError {}

/// The opcodes, by their byte.
mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const BINUNICODE: u8 = b'X';
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const APPEND: u8 = b'a';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINFLOAT: u8 = b'G';
    pub const PROTO: u8 = 0x80;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    pub const BYTEARRAY8: u8 = 0x96;
}

/// Opcodes refused, with their names and why.
fn refused(code: u8) -> Option<(&'static str, &'static str)> {
    const CODE: &str = "it would import or call Python code";
    const TEXT: &str = "a protocol 0/1 text opcode, not written for plain data by protocols 2 to 5";
    Some(match code {
        b'c' => ("GLOBAL", CODE),
        0x93 => ("STACK_GLOBAL", CODE),
        b'R' => ("REDUCE", CODE),
        b'b' => ("BUILD", CODE),
        b'i' => ("INST", CODE),
        b'o' => ("OBJ", CODE),
        0x81 => ("NEWOBJ", CODE),
        0x92 => ("NEWOBJ_EX", CODE),
        b'P' => ("PERSID", CODE),
        b'Q' => ("BINPERSID", CODE),
        0x82 => ("EXT1", CODE),
        0x83 => ("EXT2", CODE),
        0x84 => ("EXT4", CODE),
        0x97 => ("NEXT_BUFFER", "out-of-band buffers are not plain data"),
        0x98 => ("READONLY_BUFFER", "out-of-band buffers are not plain data"),
        0x8f => ("EMPTY_SET", "sets are not part of a memory snapshot"),
        0x90 => ("ADDITEMS", "sets are not part of a memory snapshot"),
        0x91 => ("FROZENSET", "sets are not part of a memory snapshot"),
        b'I' => ("INT", TEXT),
        b'L' => ("LONG", TEXT),
        b'F' => ("FLOAT", TEXT),
        b'S' => ("STRING", TEXT),
        b'T' => ("BINSTRING", "Python 2 str"),
        b'U' => ("SHORT_BINSTRING", "Python 2 str"),
        b'V' => ("UNICODE", TEXT),
        b'p' => ("PUT", TEXT),
        b'g' => ("GET", TEXT),
        _ => return None,
    })
}

/// A value on the interpreter's stack: plain, or a container in the arena
/// (containers are mutable until the end, and the memo shares them).
#[derive(Clone, Debug)]
enum Item {
    Value(PyValue),
    Obj(u32),
}

#[derive(Debug)]
enum Obj {
    List(Vec<Item>),
    Tuple(Vec<Item>),
    Dict(Vec<(Item, Item)>),
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being run.
    at: usize,
    stack: Vec<Item>,
    marks: Vec<usize>,
    memo: Memo,
    arena: Vec<Obj>,
}

/// The memo: dense keys (MEMOIZE's, and BINPUT's as Python writes them)
/// in a vector, others in a map. The vector grows by one entry at a time,
/// so a hostile key cannot make it large.
#[derive(Default)]
struct Memo {
    dense: Vec<Option<Item>>,
    sparse: HashMap<u32, Item>,
    len: usize,
}

impl Memo {
    fn put(&mut self, key: u32, v: Item) {
        let k = key as usize;
        let fresh = if k < self.dense.len() {
            self.dense[k].replace(v).is_none()
        } else if k == self.dense.len() && !self.sparse.contains_key(&key) {
            self.dense.push(Some(v));
            true
        } else {
            self.sparse.insert(key, v).is_none()
        };
        if fresh {
            self.len += 1;
        }
    }

    fn get(&self, key: u32) -> Option<&Item> {
        match self.dense.get(key as usize) {
            Some(v) => v.as_ref(),
            None => self.sparse.get(&key),
        }
    }
}

impl Machine<'_> {
    fn err(&self, message: impl Into<String>) -> PickleError {
        PickleError {
            offset: self.at,
            message: message.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], PickleError> {
        let left = self.data.len() - self.pos;
        if n > left {
            return Err(PickleError {
                offset: self.at,
                message: format!(
                    "truncated: {what} needs {n} bytes, {left} are left (the file ends at byte {})",
                    self.data.len()
                ),
            });
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self, what: &str) -> Result<u8, PickleError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, PickleError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, PickleError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, PickleError> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// A length read from the file, checked against the bytes left.
    fn len(&mut self, n: u64, what: &str) -> Result<usize, PickleError> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return Err(self.err(format!(
                "truncated or corrupt: {what} of {n} bytes runs past the end of the file ({left} bytes left)"
            )));
        }
        Ok(n as usize)
    }

    fn push(&mut self, v: PyValue) {
        self.stack.push(Item::Value(v));
    }

    fn new_obj(&mut self, o: Obj) -> Item {
        self.arena.push(o);
        Item::Obj((self.arena.len() - 1) as u32)
    }

    fn pop(&mut self, name: &str) -> Result<Item, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err(format!("{name} on an empty stack")));
        }
        Ok(self.stack.pop().expect("checked"))
    }

    fn top(&self, name: &str) -> Result<&Item, PickleError> {
        self.stack
            .last()
            .ok_or_else(|| self.err(format!("{name} on an empty stack")))
    }

    /// Pops back to the last MARK; returns the items above it.
    fn pop_mark(&mut self, name: &str) -> Result<Vec<Item>, PickleError> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.err(format!("{name} without a MARK before it")))?;
        Ok(self.stack.split_off(m))
    }

    fn string(&mut self, n: usize) -> Result<(), PickleError> {
        let at = self.at;
        let b = self.take(n, "a string")?;
        let s = std::str::from_utf8(b).map_err(|e| PickleError {
            offset: at,
            message: format!("a string that is not UTF-8 ({e})"),
        })?;
        let v = PyValue::Str(s.into());
        self.push(v);
        Ok(())
    }

    fn bytes(&mut self, n: usize) -> Result<(), PickleError> {
        let b: Arc<[u8]> = self.take(n, "bytes")?.into();
        self.push(PyValue::Bytes(b));
        Ok(())
    }

    fn long(&mut self, n: usize) -> Result<(), PickleError> {
        let b = self.take(n, "an int")?;
        if n > 16 {
            // Allow redundant sign bytes, as long as the value fits.
            let (low, high) = b.split_at(16);
            let fill = if low[15] & 0x80 != 0 { 0xff } else { 0 };
            if high.iter().any(|&x| x != fill) {
                return Err(self.err(format!(
                    "an int of {n} bytes: only ints of up to 128 bits are read"
                )));
            }
        }
        let mut buf = [0u8; 16];
        let used = n.min(16);
        buf[..used].copy_from_slice(&b[..used]);
        if used > 0 && used < 16 && b[used - 1] & 0x80 != 0 {
            for x in &mut buf[used..] {
                *x = 0xff;
            }
        }
        self.push(PyValue::int(i128::from_le_bytes(buf)));
        Ok(())
    }

    fn container(&self, item: &Item, name: &str) -> Result<u32, PickleError> {
        match item {
            Item::Obj(i) => Ok(*i),
            Item::Value(v) => Err(self.err(format!("{name} into a {}", v.type_name()))),
        }
    }

    fn append(&mut self, target: &Item, items: Vec<Item>, name: &str) -> Result<(), PickleError> {
        let i = self.container(target, name)?;
        match &mut self.arena[i as usize] {
            Obj::List(v) => {
                v.extend(items);
                Ok(())
            }
            Obj::Tuple(_) => Err(self.err(format!("{name} into a tuple"))),
            Obj::Dict(_) => Err(self.err(format!("{name} into a dict"))),
        }
    }

    fn set_items(
        &mut self,
        target: &Item,
        items: Vec<Item>,
        name: &str,
    ) -> Result<(), PickleError> {
        if items.len() % 2 != 0 {
            return Err(self.err(format!("{name} with an odd number of items")));
        }
        let i = self.container(target, name)?;
        let mut it = items.into_iter();
        let mut pairs = Vec::new();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            if let Item::Obj(o) = &k {
                if !matches!(self.arena[*o as usize], Obj::Tuple(_)) {
                    return Err(self.err(format!("{name} with an unhashable key (a list or dict)")));
                }
            }
            pairs.push((k, v));
        }
        match &mut self.arena[i as usize] {
            Obj::Dict(d) => {
                d.extend(pairs);
                Ok(())
            }
            Obj::List(_) => Err(self.err(format!("{name} into a list"))),
            Obj::Tuple(_) => Err(self.err(format!("{name} into a tuple"))),
        }
    }

    fn memo_put(&mut self, key: u32, name: &str) -> Result<(), PickleError> {
        let top = self.top(name)?.clone();
        self.memo.put(key, top);
        Ok(())
    }

    fn memo_get(&mut self, key: u32, name: &str) -> Result<(), PickleError> {
        let v = self.memo.get(key).cloned().ok_or_else(|| {
            self.err(format!(
                "{name} of memo entry {key}, which was never stored"
            ))
        })?;
        self.stack.push(v);
        Ok(())
    }

    /// Runs one opcode; `Some(root)` at STOP.
    fn step(&mut self) -> Result<Option<Item>, PickleError> {
        self.at = self.pos;
        if self.pos >= self.data.len() {
            return Err(self.err(format!(
                "truncated: the file ends at byte {} without a STOP opcode",
                self.data.len()
            )));
        }
        let code = self.data[self.pos];
        self.pos += 1;
        match code {
            op::PROTO => {
                let v = self.u8("PROTO")?;
                if !(2..=5).contains(&v) {
                    return Err(self.err(format!("pickle protocol {v}: protocols 2 to 5 are read")));
                }
            }
            op::FRAME => {
                let n = self.u64("FRAME")?;
                self.len(n, "a FRAME")?;
            }
            op::STOP => {
                let root = self.pop("STOP")?;
                return Ok(Some(root));
            }
            op::MARK => self.marks.push(self.stack.len()),
            op::POP => {
                self.pop("POP")?;
            }
            op::POP_MARK => {
                self.pop_mark("POP_MARK")?;
            }
            op::DUP => {
                let t = self.top("DUP")?.clone();
                self.stack.push(t);
            }
            op::NONE => self.push(PyValue::None),
            op::NEWTRUE => self.push(PyValue::Bool(true)),
            op::NEWFALSE => self.push(PyValue::Bool(false)),
            op::BININT => {
                let v = self.u32("BININT")? as i32;
                self.push(PyValue::Int(v.into()));
            }
            op::BININT1 => {
                let v = self.u8("BININT1")?;
                self.push(PyValue::Int(v.into()));
            }
            op::BININT2 => {
                let v = self.u16("BININT2")?;
                self.push(PyValue::Int(v.into()));
            }
            op::LONG1 => {
                let n = self.u8("LONG1")? as usize;
                self.long(n)?;
            }
            op::LONG4 => {
                let n = self.u32("LONG4")? as i32;
                if n < 0 {
                    return Err(self.err("LONG4 with a negative length"));
                }
                let n = self.len(n as u64, "an int")?;
                self.long(n)?;
            }
            op::BINFLOAT => {
                let b = self.take(8, "BINFLOAT")?;
                let v = f64::from_be_bytes(b.try_into().expect("8 bytes"));
                self.push(PyValue::Float(v));
            }
            op::SHORT_BINUNICODE => {
                let n = self.u8("SHORT_BINUNICODE")? as usize;
                self.string(n)?;
            }
            op::BINUNICODE => {
                let n = self.u32("BINUNICODE")?;
                let n = self.len(n.into(), "a string")?;
                self.string(n)?;
            }
            op::BINUNICODE8 => {
                let n = self.u64("BINUNICODE8")?;
                let n = self.len(n, "a string")?;
                self.string(n)?;
            }
            op::SHORT_BINBYTES => {
                let n = self.u8("SHORT_BINBYTES")? as usize;
                self.bytes(n)?;
            }
            op::BINBYTES => {
                let n = self.u32("BINBYTES")?;
                let n = self.len(n.into(), "bytes")?;
                self.bytes(n)?;
            }
            op::BINBYTES8 | op::BYTEARRAY8 => {
                let n = self.u64("BINBYTES8")?;
                let n = self.len(n, "bytes")?;
                self.bytes(n)?;
            }
            op::EMPTY_LIST => {
                let o = self.new_obj(Obj::List(Vec::new()));
                self.stack.push(o);
            }
            op::EMPTY_DICT => {
                let o = self.new_obj(Obj::Dict(Vec::new()));
                self.stack.push(o);
            }
            op::EMPTY_TUPLE => self.push(PyValue::Tuple(Arc::from(Vec::new()))),
            op::LIST => {
                let items = self.pop_mark("LIST")?;
                let o = self.new_obj(Obj::List(items));
                self.stack.push(o);
            }
            op::TUPLE => {
                let items = self.pop_mark("TUPLE")?;
                let o = self.new_obj(Obj::Tuple(items));
                self.stack.push(o);
            }
            op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                let n = (code - op::TUPLE1 + 1) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop("TUPLE1/2/3")?);
                }
                items.reverse();
                let o = self.new_obj(Obj::Tuple(items));
                self.stack.push(o);
            }
            op::DICT => {
                let items = self.pop_mark("DICT")?;
                let o = self.new_obj(Obj::Dict(Vec::new()));
                self.set_items(&o, items, "DICT")?;
                self.stack.push(o);
            }
            op::APPEND => {
                let v = self.pop("APPEND")?;
                let target = self.top("APPEND")?.clone();
                self.append(&target, vec![v], "APPEND")?;
            }
            op::APPENDS => {
                let items = self.pop_mark("APPENDS")?;
                let target = self.top("APPENDS")?.clone();
                self.append(&target, items, "APPENDS")?;
            }
            op::SETITEM => {
                let v = self.pop("SETITEM")?;
                let k = self.pop("SETITEM")?;
                let target = self.top("SETITEM")?.clone();
                self.set_items(&target, vec![k, v], "SETITEM")?;
            }
            op::SETITEMS => {
                let items = self.pop_mark("SETITEMS")?;
                let target = self.top("SETITEMS")?.clone();
                self.set_items(&target, items, "SETITEMS")?;
            }
            op::MEMOIZE => {
                let key = self.memo.len as u32;
                self.memo_put(key, "MEMOIZE")?;
            }
            op::BINPUT => {
                let key = self.u8("BINPUT")?;
                self.memo_put(key.into(), "BINPUT")?;
            }
            op::LONG_BINPUT => {
                let key = self.u32("LONG_BINPUT")?;
                self.memo_put(key, "LONG_BINPUT")?;
            }
            op::BINGET => {
                let key = self.u8("BINGET")?;
                self.memo_get(key.into(), "BINGET")?;
            }
            op::LONG_BINGET => {
                let key = self.u32("LONG_BINGET")?;
                self.memo_get(key, "LONG_BINGET")?;
            }
            other => {
                return Err(match refused(other) {
                    Some((name, why)) => self.err(format!(
                        "opcode {name} (0x{other:02x}) refused: {why}; only plain data \
                         (dict, list, tuple, str, bytes, int, float, bool, None) is read"
                    )),
                    None => self.err(format!("unknown opcode 0x{other:02x}")),
                });
            }
        }
        Ok(None)
    }
}

/// Turns the arena's containers into shared values, each once, emptying
/// the arena as it goes (so the two copies are not held at once).
struct Freezer {
    arena: Vec<Obj>,
    done: Vec<Option<PyValue>>,
    busy: Vec<bool>,
    offset: usize,
}

impl Freezer {
    fn freeze(&mut self, item: &Item, depth: usize) -> Result<PyValue, PickleError> {
        let i = match item {
            Item::Value(v) => return Ok(v.clone()),
            Item::Obj(i) => *i as usize,
        };
        if let Some(v) = &self.done[i] {
            return Ok(v.clone());
        }
        let err = |message: String| PickleError {
            offset: self.offset,
            message,
        };
        if depth >= MAX_DEPTH {
            return Err(err(format!("containers nested more than {MAX_DEPTH} deep")));
        }
        if self.busy[i] {
            return Err(err(
                "a container that contains itself (a cycle): not plain data".into(),
            ));
        }
        self.busy[i] = true;
        let obj = std::mem::replace(&mut self.arena[i], Obj::List(Vec::new()));
        let v = match obj {
            Obj::List(items) => PyValue::List(self.freeze_all(&items, depth)?.into()),
            Obj::Tuple(items) => PyValue::Tuple(self.freeze_all(&items, depth)?.into()),
            Obj::Dict(pairs) => {
                let mut out = Vec::with_capacity(pairs.len());
                for (k, v) in &pairs {
                    out.push((self.freeze(k, depth + 1)?, self.freeze(v, depth + 1)?));
                }
                PyValue::Dict(out.into())
            }
        };
        self.busy[i] = false;
        self.done[i] = Some(v.clone());
        Ok(v)
    }

    fn freeze_all(&mut self, items: &[Item], depth: usize) -> Result<Vec<PyValue>, PickleError> {
        items.iter().map(|x| self.freeze(x, depth + 1)).collect()
    }
}

/// Reads a pickle of plain data. `progress` is called now and then with
/// the byte offset reached.
pub fn read_with_progress(
    data: &[u8],
    progress: &mut dyn FnMut(usize),
) -> Result<PyValue, PickleError> {
    let mut m = Machine {
        data,
        pos: 0,
        at: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: Memo::default(),
        arena: Vec::new(),
    };
    if data.first() != Some(&op::PROTO) {
        return Err(PickleError {
            offset: 0,
            message: "not a pickle of protocol 2 or later (it does not start with PROTO, 0x80)"
                .into(),
        });
    }
    let mut steps = 0u64;
    let root = loop {
        if let Some(root) = m.step()? {
            break root;
        }
        steps += 1;
        if steps % (1 << 20) == 0 {
            progress(m.pos);
        }
    };
    let stop = m.at;
    let Machine {
        arena, memo, stack, ..
    } = m;
    drop((memo, stack));
    let mut f = Freezer {
        done: vec![None; arena.len()],
        busy: vec![false; arena.len()],
        arena,
        offset: stop,
    };
    f.freeze(&root, 0)
}

/// Reads a pickle of plain data.
#[cfg_attr(not(test), allow(dead_code))] // API; the tests use it
pub fn read(data: &[u8]) -> Result<PyValue, PickleError> {
    read_with_progress(data, &mut |_| {})
}

/// Items per APPENDS or SETITEMS, as Python batches them.
const BATCH: usize = 1000;

struct Writer<'a, W: Write> {
    w: W,
    /// Strings written so far and their memo slots.
    memo: HashMap<&'a str, u32>,
}

impl<'a, W: Write> Writer<'a, W> {
    fn value(&mut self, v: &'a PyValue) -> io::Result<()> {
        match v {
            PyValue::None => self.w.write_all(&[op::NONE]),
            PyValue::Bool(true) => self.w.write_all(&[op::NEWTRUE]),
            PyValue::Bool(false) => self.w.write_all(&[op::NEWFALSE]),
            PyValue::Int(i) => self.int((*i).into()),
            PyValue::BigInt(i) => self.int(**i),
            PyValue::Float(x) => {
                self.w.write_all(&[op::BINFLOAT])?;
                self.w.write_all(&x.to_be_bytes())
            }
            PyValue::Str(s) => self.string(s),
            PyValue::Bytes(b) => {
                if b.len() < 256 {
                    self.w.write_all(&[op::SHORT_BINBYTES, b.len() as u8])?;
                } else if let Ok(n) = u32::try_from(b.len()) {
                    self.w.write_all(&[op::BINBYTES])?;
                    self.w.write_all(&n.to_le_bytes())?;
                } else {
                    self.w.write_all(&[op::BINBYTES8])?;
                    self.w.write_all(&(b.len() as u64).to_le_bytes())?;
                }
                self.w.write_all(b)
            }
            PyValue::List(items) => {
                self.w.write_all(&[op::EMPTY_LIST])?;
                for chunk in items.chunks(BATCH) {
                    if chunk.len() == 1 {
                        self.value(&chunk[0])?;
                        self.w.write_all(&[op::APPEND])?;
                    } else {
                        self.w.write_all(&[op::MARK])?;
                        for x in chunk {
                            self.value(x)?;
                        }
                        self.w.write_all(&[op::APPENDS])?;
                    }
                }
                Ok(())
            }
            PyValue::Tuple(items) => match items.len() {
                0 => self.w.write_all(&[op::EMPTY_TUPLE]),
                n @ 1..=3 => {
                    for x in items.iter() {
                        self.value(x)?;
                    }
                    self.w.write_all(&[op::TUPLE1 + (n as u8 - 1)])
                }
                _ => {
                    self.w.write_all(&[op::MARK])?;
                    for x in items.iter() {
                        self.value(x)?;
                    }
                    self.w.write_all(&[op::TUPLE])
                }
            },
            PyValue::Dict(pairs) => {
                self.w.write_all(&[op::EMPTY_DICT])?;
                for chunk in pairs.chunks(BATCH) {
                    self.w.write_all(&[op::MARK])?;
                    for (k, x) in chunk {
                        self.value(k)?;
                        self.value(x)?;
                    }
                    self.w.write_all(&[op::SETITEMS])?;
                }
                Ok(())
            }
        }
    }

    fn int(&mut self, i: i128) -> io::Result<()> {
        if (0..=0xff).contains(&i) {
            self.w.write_all(&[op::BININT1, i as u8])
        } else if (0..=0xffff).contains(&i) {
            self.w.write_all(&[op::BININT2])?;
            self.w.write_all(&(i as u16).to_le_bytes())
        } else if let Ok(v) = i32::try_from(i) {
            self.w.write_all(&[op::BININT])?;
            self.w.write_all(&v.to_le_bytes())
        } else {
            // Two's complement, little-endian, as few bytes as keep the sign.
            let b = i.to_le_bytes();
            let mut n = 16;
            while n > 1 {
                let (last, prev) = (b[n - 1], b[n - 2]);
                let redundant =
                    (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0);
                if !redundant {
                    break;
                }
                n -= 1;
            }
            self.w.write_all(&[op::LONG1, n as u8])?;
            self.w.write_all(&b[..n])
        }
    }

    fn string(&mut self, s: &'a str) -> io::Result<()> {
        if let Some(&slot) = self.memo.get(s) {
            return if let Ok(b) = u8::try_from(slot) {
                self.w.write_all(&[op::BINGET, b])
            } else {
                self.w.write_all(&[op::LONG_BINGET])?;
                self.w.write_all(&slot.to_le_bytes())
            };
        }
        let b = s.as_bytes();
        if b.len() < 256 {
            self.w.write_all(&[op::SHORT_BINUNICODE, b.len() as u8])?;
        } else if let Ok(n) = u32::try_from(b.len()) {
            self.w.write_all(&[op::BINUNICODE])?;
            self.w.write_all(&n.to_le_bytes())?;
        } else {
            self.w.write_all(&[op::BINUNICODE8])?;
            self.w.write_all(&(b.len() as u64).to_le_bytes())?;
        }
        self.w.write_all(b)?;
        // Memoize short strings only: they are the ones that repeat
        // (keys, actions, states), and the memo stays small.
        if b.len() <= 64 {
            if let Ok(slot) = u32::try_from(self.memo.len()) {
                self.w.write_all(&[op::MEMOIZE])?;
                self.memo.insert(s, slot);
            }
        }
        Ok(())
    }
}

/// Writes `v` as a protocol 4 pickle.
pub fn write(v: &PyValue, w: impl Write) -> io::Result<()> {
    let mut wr = Writer {
        w,
        memo: HashMap::new(),
    };
    wr.w.write_all(&[op::PROTO, 4])?;
    wr.value(v)?;
    wr.w.write_all(&[op::STOP])?;
    wr.w.flush()
}

/// `v` as a protocol 4 pickle, in memory.
#[cfg_attr(not(test), allow(dead_code))] // API; the tests use it
pub fn to_vec(v: &PyValue) -> Vec<u8> {
    let mut out = Vec::new();
    write(v, &mut out).expect("writing to memory");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
                            PyValue::dict([
                                ("action", PyValue::str("alloc")),
                                ("i", PyValue::int(i)),
                            ])
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
            0x80, 0x02, 0x7d, 0x71, 0x00, 0x28, 0x58, 0x01, 0x00, 0x00, 0x00, 0x61, 0x71, 0x01,
            0x4b, 0x01, 0x58, 0x01, 0x00, 0x00, 0x00, 0x62, 0x71, 0x02, 0x4b, 0x02, 0x4b, 0x03,
            0x86, 0x71, 0x03, 0x75, 0x2e,
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
}
