//! Configuration plumbing shared by every YAML document Strait reads (discovery files, the
//! gateway's and the control plane's configuration, policies): reading a file, parsing YAML
//! with the field path and line of every error, duration fields (`500ms`, `2s`), and the
//! errors that name the file, the line and the field.

use std::fmt;
use std::path::{Path, PathBuf};

/// A discovery file that could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("{path}: cannot read the discovery file: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", .0)]
    Invalid(Box<InvalidFile>),
}

/// Where and why a discovery file is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidFile {
    pub path: PathBuf,
    pub line: u64,
    pub column: u64,
    /// The field path, e.g. `services[0].endpoints[1].zone`; empty for the document itself.
    pub field: String,
    pub message: String,
}

impl fmt::Display for InvalidFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.path.display(), self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// Read a configuration file whole (the read half of every `load`).
pub fn read_file(path: &Path) -> Result<String, DiscoveryError> {
    std::fs::read_to_string(path).map_err(|source| DiscoveryError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Parse YAML with field paths and line numbers in errors. Shared by every YAML document Strait
/// reads.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, DiscoveryError> {
    let mut field = String::new();
    let options = serde_saphyr::options! { with_snippet: false };
    let result = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            field = e.path().to_string();
            e.into_inner()
        })
    });
    result.map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        // `Spanned` wrappers show up as `.value` segments; they are not fields the user wrote.
        field = field.replace(".value.", ".").replace(".value[", "[");
        if let Some(f) = field.strip_suffix(".value") {
            field = f.to_string();
        }
        if field == "." || field == "value" {
            field.clear();
        }
        let message = clean_message(&e.to_string());
        invalid(path, line, column, field, message)
    })
}

/// serde-saphyr's messages may carry their own location suffix; we print ours in front.
fn clean_message(message: &str) -> String {
    let first = message.lines().next().unwrap_or(message).trim();
    let first = match first.find(" at line ") {
        Some(i) => &first[..i],
        None => first,
    };
    first.to_string()
}

pub(crate) fn invalid(
    path: &Path,
    line: u64,
    column: u64,
    field: impl Into<String>,
    message: impl Into<String>,
) -> DiscoveryError {
    DiscoveryError::Invalid(Box::new(InvalidFile {
        path: path.to_path_buf(),
        line,
        column,
        field: field.into(),
        message: message.into(),
    }))
}

/// `#[serde(with = "federation::config::duration_field")]`: a duration written like `500ms`
/// or `2s` in a configuration file.
pub mod duration_field {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!("`{s}` is not a duration (e.g. 500ms, 2s): {e}"))
        })
    }
}

/// A configuration file (gateway, control plane) that cannot be used: unreadable or not valid
/// YAML (with file:line:column), or a value that breaks a rule (file and field).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] DiscoveryError),
    #[error("{path}: {field}: {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
}
