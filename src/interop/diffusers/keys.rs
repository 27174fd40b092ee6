//! Reading diffusers' JSON configs key by key, with the library's defaults, and refusing any
//! key by name.

use std::path::Path;

use serde_json::{Map, Value};

use crate::{Error, Result};

/// The keys of one JSON config object, read with diffusers' defaults and refused by name.
pub(super) struct Keys<'a> {
    pub(super) map: &'a Map<String, Value>,
    path: &'a Path,
    what: &'static str,
}

impl<'a> Keys<'a> {
    pub(super) fn new(v: &'a Value, path: &'a Path, what: &'static str) -> Result<Self> {
        let map =
            v.as_object().ok_or_else(|| Error::bad_file(path, format!("the {what} is not a JSON object")))?;
        Ok(Keys { map, path, what })
    }

    pub(super) fn bad(&self, key: &str, reason: &str) -> Error {
        Error::bad_file(self.path, format!("{} key `{key}`: {reason}", self.what))
    }

    pub(super) fn class_name(&self, want: &str) -> Result<()> {
        match self.map.get("_class_name") {
            None => Ok(()),
            Some(Value::String(s)) if s == want => Ok(()),
            Some(other) => Err(self.bad("_class_name", &format!("{other}; ddpm reads {want} only"))),
        }
    }

    /// Keys starting with `_` are diffusers' bookkeeping and ignored.
    pub(super) fn refuse_unknown(&self, known: &[&str]) -> Result<()> {
        match self.map.keys().find(|k| !k.starts_with('_') && !known.contains(&k.as_str())) {
            Some(k) => Err(self.bad(k, "unknown to ddpm's mapping, so its effect cannot be reproduced")),
            None => Ok(()),
        }
    }

    pub(super) fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub(super) fn is_null_or_absent(&self, key: &str) -> bool {
        self.get(key).is_none()
    }

    pub(super) fn str_or(&self, key: &str, default: &'static str) -> Result<&'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.bad(key, &format!("{v} is not a string"))),
        }
    }

    pub(super) fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.bad(key, &format!("{v} is not true/false"))),
        }
    }

    pub(super) fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.bad(key, &format!("{v} is not a number"))),
        }
    }

    pub(super) fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| self.bad(key, &format!("{v} is not a non-negative integer"))),
        }
    }

    pub(super) fn str_list(&self, key: &str) -> Result<Vec<&'a str>> {
        let v = self.get(key).ok_or_else(|| self.bad(key, "missing"))?;
        v.as_array()
            .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.bad(key, &format!("{v} is not a list of strings")))
    }

    pub(super) fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        let v = self.get(key).ok_or_else(|| self.bad(key, "missing"))?;
        v.as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.bad(key, &format!("{v} is not a list of integers")))
    }

    /// A value that must equal `want` (diffusers' default `default` when absent).
    pub(super) fn require(&self, key: &str, default: Value, want: &[Value], reason: &str) -> Result<()> {
        let got = self.map.get(key).cloned().unwrap_or(default);
        if want.contains(&got) {
            Ok(())
        } else {
            Err(self.bad(key, &format!("{got} is not supported: {reason}")))
        }
    }
}
