//! The writer: protocol 4 with only the opcodes PyTorch's memory viewer
//! reads, containers filled in batches, repeated strings memoized.

use std::collections::HashMap;
use std::io::{self, Write};

use super::op;
use crate::pyvalue::PyValue;

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
