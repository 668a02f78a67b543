//! The reader: a small interpreter of the opcodes plain data needs, which
//! refuses every opcode that would import or call code (see the module
//! above), then freezes the containers it built into shared values.

use std::collections::HashMap;
use std::sync::Arc;

use super::{op, PickleError, MAX_DEPTH};
use crate::pyvalue::PyValue;

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
