//! Python's plain data as a Rust value: what a PyTorch memory snapshot is
//! made of (dicts, lists, tuples, str, int, float, bool, None, bytes).
//!
//! [`PyValue`] is what [`crate::pickle`] reads and writes; it reads from
//! and writes to JSON too (tuples become arrays there), so a snapshot can
//! be handled the same way in either form. Containers are shared
//! (`Arc`), as a pickle's memo shares them, so a value read from a file
//! takes no more memory than the file describes.

use std::fmt;
use std::sync::Arc;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

/// A Python value of plain data.
#[derive(Clone, Debug, PartialEq)]
pub enum PyValue {
    None,
    Bool(bool),
    /// Python's int, within 64 bits (see [`PyValue::int`]).
    Int(i64),
    /// Python's int, past 64 bits but within 128 (boxed, to keep values
    /// small: most ints fit in 64 bits).
    BigInt(Arc<i128>),
    Float(f64),
    Str(Arc<str>),
    Bytes(Arc<[u8]>),
    List(Arc<[PyValue]>),
    Tuple(Arc<[PyValue]>),
    /// Key-value pairs in insertion order; a key given twice counts as
    /// its last value, as in Python.
    Dict(Arc<[(PyValue, PyValue)]>),
}

impl PyValue {
    /// A `str`.
    pub fn str(s: &str) -> PyValue {
        PyValue::Str(s.into())
    }

    /// An `int`: [`PyValue::Int`] where it fits, else [`PyValue::BigInt`].
    pub fn int(i: impl Into<i128>) -> PyValue {
        let i = i.into();
        match i64::try_from(i) {
            Ok(v) => PyValue::Int(v),
            Err(_) => PyValue::BigInt(Arc::new(i)),
        }
    }

    /// A `list`.
    pub fn list(items: Vec<PyValue>) -> PyValue {
        PyValue::List(items.into())
    }

    /// A `tuple`.
    pub fn tuple(items: Vec<PyValue>) -> PyValue {
        PyValue::Tuple(items.into())
    }

    /// A `dict` with `str` keys (snapshots are built with shared keys
    /// instead: `snapshot::snapshot_value`).
    #[cfg_attr(not(test), allow(dead_code))] // the tests build values with it
    pub fn dict<'a>(pairs: impl IntoIterator<Item = (&'a str, PyValue)>) -> PyValue {
        PyValue::Dict(
            pairs
                .into_iter()
                .map(|(k, v)| (PyValue::str(k), v))
                .collect::<Vec<_>>()
                .into(),
        )
    }

    /// Python's name for the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            PyValue::None => "None",
            PyValue::Bool(_) => "bool",
            PyValue::Int(_) | PyValue::BigInt(_) => "int",
            PyValue::Float(_) => "float",
            PyValue::Str(_) => "str",
            PyValue::Bytes(_) => "bytes",
            PyValue::List(_) => "list",
            PyValue::Tuple(_) => "tuple",
            PyValue::Dict(_) => "dict",
        }
    }

    /// The value of `key` in a dict (the last one if the key is repeated).
    pub fn get(&self, key: &str) -> Option<&PyValue> {
        match self {
            PyValue::Dict(pairs) => pairs
                .iter()
                .rev()
                .find(|(k, _)| matches!(k, PyValue::Str(s) if &**s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i128> {
        match self {
            PyValue::Int(i) => Some((*i).into()),
            PyValue::BigInt(i) => Some(**i),
            _ => None,
        }
    }

    /// An int that fits a `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_int().and_then(|i| u64::try_from(i).ok())
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            PyValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            PyValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The items of a list or a tuple.
    pub fn as_seq(&self) -> Option<&[PyValue]> {
        match self {
            PyValue::List(v) | PyValue::Tuple(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_dict(&self) -> Option<&[(PyValue, PyValue)]> {
        match self {
            PyValue::Dict(d) => Some(d),
            _ => None,
        }
    }
}

impl fmt::Display for PyValue {
    /// A short rendering for messages (containers show their length).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PyValue::None => write!(f, "None"),
            PyValue::Bool(b) => write!(f, "{}", if *b { "True" } else { "False" }),
            PyValue::Int(i) => write!(f, "{i}"),
            PyValue::BigInt(i) => write!(f, "{i}"),
            PyValue::Float(x) => write!(f, "{x}"),
            PyValue::Str(s) if s.chars().count() > 40 => {
                let short: String = s.chars().take(40).collect();
                write!(f, "{short:?}…")
            }
            PyValue::Str(s) => write!(f, "{s:?}"),
            PyValue::Bytes(b) => write!(f, "bytes of length {}", b.len()),
            PyValue::List(v) => write!(f, "list of {} items", v.len()),
            PyValue::Tuple(v) => write!(f, "tuple of {} items", v.len()),
            PyValue::Dict(d) => write!(f, "dict of {} keys", d.len()),
        }
    }
}

/// JSON: tuples as arrays, bytes as arrays of numbers, non-finite floats
/// as null, dict keys that are not strings as their rendering.
impl Serialize for PyValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PyValue::None => s.serialize_unit(),
            PyValue::Bool(b) => s.serialize_bool(*b),
            PyValue::Int(i) => s.serialize_i64(*i),
            PyValue::BigInt(i) => match u64::try_from(**i) {
                Ok(v) => s.serialize_u64(v),
                _ => s.serialize_i128(**i),
            },
            PyValue::Float(x) => s.serialize_f64(*x),
            PyValue::Str(v) => s.serialize_str(v),
            PyValue::Bytes(b) => {
                let mut seq = s.serialize_seq(Some(b.len()))?;
                for x in b.iter() {
                    seq.serialize_element(x)?;
                }
                seq.end()
            }
            PyValue::List(v) | PyValue::Tuple(v) => {
                let mut seq = s.serialize_seq(Some(v.len()))?;
                for x in v.iter() {
                    seq.serialize_element(x)?;
                }
                seq.end()
            }
            PyValue::Dict(d) => {
                let mut map = s.serialize_map(Some(d.len()))?;
                for (k, v) in d.iter() {
                    match k {
                        PyValue::Str(k) => map.serialize_entry(&**k, v)?,
                        PyValue::Int(_) | PyValue::BigInt(_) => {
                            map.serialize_entry(&k.to_string(), v)?
                        }
                        other => map.serialize_entry(&other.to_string(), v)?,
                    }
                }
                map.end()
            }
        }
    }
}

/// From JSON: arrays become lists, objects dicts, integers ints, other
/// numbers floats.
impl<'de> Deserialize<'de> for PyValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PyValue, D::Error> {
        d.deserialize_any(PyVisitor)
    }
}

struct PyVisitor;

impl<'de> Visitor<'de> for PyVisitor {
    type Value = PyValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a JSON value")
    }
    fn visit_unit<E>(self) -> Result<PyValue, E> {
        Ok(PyValue::None)
    }
    fn visit_none<E>(self) -> Result<PyValue, E> {
        Ok(PyValue::None)
    }
    fn visit_bool<E>(self, v: bool) -> Result<PyValue, E> {
        Ok(PyValue::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<PyValue, E> {
        Ok(PyValue::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<PyValue, E> {
        Ok(PyValue::int(v))
    }
    fn visit_i128<E>(self, v: i128) -> Result<PyValue, E> {
        Ok(PyValue::int(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<PyValue, E> {
        Ok(PyValue::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<PyValue, E> {
        Ok(PyValue::str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PyValue, A::Error> {
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(x) = seq.next_element()? {
            v.push(x);
        }
        Ok(PyValue::list(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PyValue, A::Error> {
        let mut v = Vec::with_capacity(map.size_hint().unwrap_or(0).min(4096));
        while let Some((k, x)) = map.next_entry::<String, PyValue>()? {
            v.push((PyValue::str(&k), x));
        }
        Ok(PyValue::Dict(v.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_both_ways() {
        let v = PyValue::dict([
            ("a", PyValue::int(1)),
            ("b", PyValue::tuple(vec![PyValue::int(0), PyValue::int(-3)])),
            ("c", PyValue::list(vec![PyValue::None, PyValue::Bool(true)])),
            ("d", PyValue::Float(1.5)),
            ("e", PyValue::int(u64::MAX)),
        ]);
        let text = serde_json::to_string(&v).unwrap();
        assert_eq!(
            text,
            r#"{"a":1,"b":[0,-3],"c":[null,true],"d":1.5,"e":18446744073709551615}"#
        );
        let back: PyValue = serde_json::from_str(&text).unwrap();
        assert_eq!(back.get("e").and_then(PyValue::as_u64), Some(u64::MAX));
        assert_eq!(back.get("b").and_then(PyValue::as_seq).unwrap().len(), 2);
    }

    #[test]
    fn values_stay_small() {
        assert!(std::mem::size_of::<PyValue>() <= 24);
        assert_eq!(PyValue::int(5), PyValue::Int(5));
        assert_eq!(PyValue::int(u64::MAX).as_u64(), Some(u64::MAX));
        assert_eq!(PyValue::int(i128::MIN).as_int(), Some(i128::MIN));
    }

    #[test]
    fn last_key_wins() {
        let v = PyValue::dict([("k", PyValue::int(1)), ("k", PyValue::int(2))]);
        assert_eq!(v.get("k"), Some(&PyValue::int(2)));
        assert_eq!(v.get("x"), None);
    }
}
