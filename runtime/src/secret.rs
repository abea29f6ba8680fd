//! Credentials from the environment, as the operator sets them from Secrets:
//! a variable holding the value, or a `..._FILE` variable naming a mounted
//! Secret key (preferred: files are not in the process's environment).

/// The value of the file `file_var` names, else of `var`; `None` when neither
/// is set. A file's trailing newline is dropped: a Secret written by hand
/// often ends with one the server never saw.
pub fn from_env_or_file(
    env: &impl Fn(&str) -> Option<String>,
    read_file: &impl Fn(&str) -> std::io::Result<String>,
    var: &str,
    file_var: &str,
) -> Result<Option<String>, String> {
    match env(file_var).filter(|path| !path.is_empty()) {
        Some(path) => read_file(&path)
            .map(|text| Some(text.trim_end_matches(['\r', '\n']).to_owned()))
            .map_err(|e| format!("{file_var}={path}: {e}")),
        None => Ok(env(var)),
    }
}
