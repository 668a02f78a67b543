//! Python pickles of plain data, read and written without Python.
//!
//! [`read`] (`read.rs`) is a small interpreter of the opcodes that plain
//! data needs (protocols 2 to 5: dicts, lists, tuples, str, bytes, int,
//! float, bool, None, and the memo that shares them). A pickle is
//! untrusted input: every opcode that would import or call code (GLOBAL,
//! STACK_GLOBAL, REDUCE, BUILD, INST, OBJ, NEWOBJ, PERSID, …) is refused
//! with its name and byte offset, nothing runs, and every length is
//! checked against the bytes left, so memory stays proportional to the
//! file.
//!
//! [`write`] (`write.rs`) writes protocol 4 with only the opcodes
//! PyTorch's memory viewer (`MemoryViz.js`) reads: no frames, no bytes
//! opcodes, containers filled in batches of 1000, repeated strings
//! memoized. This file holds what both share: the opcodes and the error.

mod read;
#[cfg(test)]
mod tests;
mod write;

use std::fmt;

#[cfg_attr(not(test), allow(unused_imports))] // `read`: the tests use it
pub use read::{read, read_with_progress};
#[cfg_attr(not(test), allow(unused_imports))] // `to_vec`: the tests use it
pub use write::{to_vec, write};

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
