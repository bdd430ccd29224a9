//! Reading `config.json` with errors that name the file, the key and what was expected.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::LoadError;

/// A parsed `config.json` object.
pub struct ConfigJson {
    path: PathBuf,
    root: Map<String, Value>,
}

impl ConfigJson {
    pub fn read(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("config.json");
        if !dir.is_dir() {
            return Err(LoadError::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        if !path.exists() {
            return Err(LoadError::MissingConfig {
                dir: dir.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|cause| LoadError::Io {
            path: path.clone(),
            cause,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: PathBuf, text: &str) -> Result<Self, LoadError> {
        let value: Value = serde_json::from_str(text).map_err(|e| LoadError::MalformedConfig {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        match value {
            Value::Object(root) => Ok(ConfigJson { path, root }),
            other => Err(LoadError::MalformedConfig {
                path,
                reason: format!("expected a JSON object, found {}", kind(&other)),
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn malformed(&self, reason: impl Into<String>) -> LoadError {
        LoadError::MalformedConfig {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    pub fn unsupported(&self, reason: impl Into<String>) -> LoadError {
        LoadError::Unsupported {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.root.get(key).is_some_and(|v| !v.is_null())
    }

    /// The top-level value of `key`, unparsed (None when absent).
    pub fn raw(&self, key: &str) -> Option<&Value> {
        self.root.get(key)
    }

    pub fn model_type(&self) -> Result<Option<&str>, LoadError> {
        match self.root.get("model_type") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.malformed(format!(
                "key \"model_type\" must be a string, found {}",
                kind(other)
            ))),
        }
    }

    /// The nested object `key`, or an empty view when absent.
    pub fn section(&self, key: &str) -> Result<Section<'_>, LoadError> {
        match self.root.get(key) {
            None | Some(Value::Null) => Ok(Section {
                config: self,
                prefix: format!("{key}."),
                map: None,
            }),
            Some(Value::Object(map)) => Ok(Section {
                config: self,
                prefix: format!("{key}."),
                map: Some(map),
            }),
            Some(other) => Err(self.malformed(format!(
                "key \"{key}\" must be an object, found {}",
                kind(other)
            ))),
        }
    }

    pub fn top(&self) -> Section<'_> {
        Section {
            config: self,
            prefix: String::new(),
            map: Some(&self.root),
        }
    }
}

/// Typed getters over one object of the config; errors name `prefix + key`.
pub struct Section<'a> {
    config: &'a ConfigJson,
    prefix: String,
    map: Option<&'a Map<String, Value>>,
}

impl Section<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.and_then(|m| m.get(key)).filter(|v| !v.is_null())
    }

    fn wrong(&self, key: &str, want: &str, found: &Value) -> LoadError {
        self.config.malformed(format!(
            "key \"{}{key}\" must be {want}, found {found}",
            self.prefix
        ))
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(n as usize)),
                _ => Err(self.wrong(key, "a positive integer", v)),
            },
        }
    }

    /// A non-negative integer (zero allowed).
    pub fn count_opt(&self, key: &str) -> Result<Option<usize>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.wrong(key, "a non-negative integer", v)),
        }
    }

    pub fn usize_req(&self, key: &str) -> Result<usize, LoadError> {
        self.usize_opt(key)?.ok_or_else(|| {
            self.config.malformed(format!(
                "missing key \"{}{key}\" (a positive integer)",
                self.prefix
            ))
        })
    }

    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a finite number", v)),
        }
    }

    /// A list of finite numbers.
    pub fn f64_list_opt(&self, key: &str) -> Result<Option<Vec<f64>>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_f64().filter(|x| x.is_finite()))
                .collect::<Option<Vec<f64>>>()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a list of finite numbers", self.get(key).unwrap())),
            Some(v) => Err(self.wrong(key, "a list of finite numbers", v)),
        }
    }

    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(key, "true or false", v)),
        }
    }

    /// A list of strings.
    pub fn str_list_opt(&self, key: &str) -> Result<Option<Vec<String>>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(String::from))
                .collect::<Option<Vec<String>>>()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a list of strings", self.get(key).unwrap())),
            Some(v) => Err(self.wrong(key, "a list of strings", v)),
        }
    }

    pub fn str_opt(&self, key: &str) -> Result<Option<&str>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    /// A positive integer, or `"auto"` (→ `None`).
    pub fn usize_or_auto(&self, key: &str) -> Result<Option<usize>, LoadError> {
        match self.get(key) {
            Some(Value::String(s)) if s == "auto" => Ok(None),
            Some(v) if !v.is_u64() => Err(self.wrong(key, "a positive integer or \"auto\"", v)),
            _ => self.usize_opt(key),
        }
    }

    /// A number that must be a whole positive value (HF writes `expand` as an int).
    pub fn whole_opt(&self, key: &str) -> Result<Option<usize>, LoadError> {
        match self.f64_opt(key)? {
            None => Ok(None),
            Some(x) if x >= 1.0 && x.fract() == 0.0 => Ok(Some(x as usize)),
            Some(_) => Err(self.wrong(key, "a positive whole number", self.get(key).unwrap())),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
