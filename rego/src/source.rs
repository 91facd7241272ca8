//! Reading Rego modules and JSON data from disk.

use std::path::{Path, PathBuf};

use regorus::Value;

/// A Rego module: where it came from and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// File path (used in compiler messages).
    pub path: String,
    /// Rego source.
    pub text: String,
}

/// Why a policy cannot be loaded or compiled.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A file or directory cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A directory with no `.rego` file.
    #[error("{0}: no .rego files found")]
    NoModules(PathBuf),
    /// The compiler refused a module.
    #[error("policy does not compile: {0}")]
    Compile(String),
    /// Neither entry point is defined.
    #[error(
        "policy defines neither data.mandate.authz.decision nor data.mandate.authz.allow; \
         write `package mandate.authz` with a `decision` object or an `allow` boolean"
    )]
    NoEntryPoint,
    /// The data document is unusable.
    #[error("data {path}: {why}")]
    Data {
        /// The data file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// Reads one `.rego` file, or every `.rego` file under a directory (recursively, in path order).
pub fn read_modules(path: &Path) -> Result<Vec<Module>, PolicyError> {
    let read_err = |path: &Path, source| PolicyError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(|e| read_err(path, e))?;
    let mut files = Vec::new();
    if meta.is_dir() {
        collect_rego_files(path, &mut files).map_err(|e| read_err(path, e))?;
        files.sort();
    } else {
        files.push(path.to_owned());
    }
    if files.is_empty() {
        return Err(PolicyError::NoModules(path.to_owned()));
    }
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).map_err(|e| read_err(&file, e))?;
            Ok(Module {
                path: file.display().to_string(),
                text,
            })
        })
        .collect()
}

fn collect_rego_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_rego_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rego") {
            out.push(path);
        }
    }
    Ok(())
}

/// Reads a JSON data document; its top level must be an object (it becomes `data`).
pub fn read_data(path: &Path) -> Result<Value, PolicyError> {
    let data_err = |why: String| PolicyError::Data {
        path: path.to_owned(),
        why,
    };
    let text = std::fs::read(path).map_err(|e| PolicyError::Read {
        path: path.to_owned(),
        source: e,
    })?;
    let value: Value =
        serde_json::from_slice(&text).map_err(|e| data_err(format!("not JSON: {e}")))?;
    if value.as_object().is_err() {
        return Err(data_err("the top level must be a JSON object".to_owned()));
    }
    Ok(value)
}
