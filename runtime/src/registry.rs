//! The schema registry's client, as every command that asks one makes it:
//! the URL, credentials and a CA from the environment (variables or mounted
//! files), on a runtime of its own (the callers are not async).

use keystone_avro::registry::{Auth, Registry, RegistryConfig};

/// Basic auth: the user name (the password in the next two).
pub const ENV_REGISTRY_USERNAME: &str = "KEYSTONE_REGISTRY_USERNAME";
pub const ENV_REGISTRY_PASSWORD: &str = "KEYSTONE_REGISTRY_PASSWORD";
/// A file holding the password (a mounted Secret key), instead of the variable.
pub const ENV_REGISTRY_PASSWORD_FILE: &str = "KEYSTONE_REGISTRY_PASSWORD_FILE";
/// A bearer token, or a file holding one.
pub const ENV_REGISTRY_TOKEN: &str = "KEYSTONE_REGISTRY_TOKEN";
pub const ENV_REGISTRY_TOKEN_FILE: &str = "KEYSTONE_REGISTRY_TOKEN_FILE";
/// PEM certificates to trust for an `https` registry, besides the system's.
pub const ENV_REGISTRY_CA_FILE: &str = "KEYSTONE_REGISTRY_CA_FILE";

/// A registry client for `url`, with credentials and a CA from the
/// environment, and the runtime it runs on (the stage's loop is not async).
pub fn client(
    url: &str,
    env: &impl Fn(&str) -> Option<String>,
    read_file: &impl Fn(&str) -> std::io::Result<Vec<u8>>,
) -> Result<(tokio::runtime::Runtime, Registry), String> {
    let config = RegistryConfig {
        url: url.to_owned(),
        auth: auth_from(env, read_file)?,
        ca_pem: match env(ENV_REGISTRY_CA_FILE).filter(|p| !p.is_empty()) {
            Some(path) => {
                Some(read_file(&path).map_err(|e| format!("{ENV_REGISTRY_CA_FILE}={path}: {e}"))?)
            }
            None => None,
        },
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the schema registry client: {e}"))?;
    // The client's connection pool belongs to the runtime it is used on.
    let registry = {
        let _entered = runtime.enter();
        Registry::new(&config).map_err(|e| e.to_string())?
    };
    Ok((runtime, registry))
}

/// Basic auth or a bearer token from the environment, if either is set.
fn auth_from(
    env: &impl Fn(&str) -> Option<String>,
    read_file: &impl Fn(&str) -> std::io::Result<Vec<u8>>,
) -> Result<Option<Auth>, String> {
    let as_text =
        |path: &str| read_file(path).map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
    let secret = |var: &str, file_var: &str| {
        crate::secret::from_env_or_file(env, &as_text, var, file_var)
            .map(|value| value.filter(|v| !v.is_empty()))
    };
    let username = env(ENV_REGISTRY_USERNAME).filter(|u| !u.is_empty());
    let token = secret(ENV_REGISTRY_TOKEN, ENV_REGISTRY_TOKEN_FILE)?;
    match (username, token) {
        (Some(_), Some(_)) => Err(format!(
            "both {ENV_REGISTRY_USERNAME} and a bearer token ({ENV_REGISTRY_TOKEN} or {ENV_REGISTRY_TOKEN_FILE}) are set; set one"
        )),
        (Some(username), None) => {
            let password = secret(ENV_REGISTRY_PASSWORD, ENV_REGISTRY_PASSWORD_FILE)?.ok_or_else(|| {
                format!("{ENV_REGISTRY_USERNAME} is set but neither {ENV_REGISTRY_PASSWORD} nor {ENV_REGISTRY_PASSWORD_FILE} is")
            })?;
            Ok(Some(Auth::Basic { username, password }))
        }
        (None, Some(token)) => Ok(Some(Auth::Bearer(token))),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn auth(vars: &[(&str, &str)], files: &[(&str, &str)]) -> Result<Option<Auth>, String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let files: HashMap<String, Vec<u8>> = files
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        auth_from(&|name: &str| vars.get(name).cloned(), &|path: &str| {
            files
                .get(path)
                .cloned()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"))
        })
    }

    #[test]
    fn credentials_come_from_the_environment_or_mounted_files() {
        assert_eq!(auth(&[], &[]), Ok(None));
        assert_eq!(
            auth(
                &[
                    (ENV_REGISTRY_USERNAME, "app"),
                    (ENV_REGISTRY_PASSWORD, "pw")
                ],
                &[]
            ),
            Ok(Some(Auth::Basic {
                username: "app".into(),
                password: "pw".into()
            }))
        );
        assert_eq!(
            auth(
                &[
                    (ENV_REGISTRY_USERNAME, "app"),
                    (ENV_REGISTRY_PASSWORD_FILE, "/s/pw")
                ],
                &[("/s/pw", "secret\n")]
            ),
            Ok(Some(Auth::Basic {
                username: "app".into(),
                password: "secret".into()
            })),
            "a mounted key's trailing newline is not part of it"
        );
        assert_eq!(
            auth(&[(ENV_REGISTRY_TOKEN_FILE, "/s/t")], &[("/s/t", "tok\n")]),
            Ok(Some(Auth::Bearer("tok".into())))
        );
    }

    #[test]
    fn incomplete_or_conflicting_credentials_are_refused_by_name() {
        let missing = auth(&[(ENV_REGISTRY_USERNAME, "app")], &[]).unwrap_err();
        assert!(missing.contains(ENV_REGISTRY_PASSWORD), "{missing}");
        let both = auth(
            &[(ENV_REGISTRY_USERNAME, "app"), (ENV_REGISTRY_TOKEN, "t")],
            &[],
        )
        .unwrap_err();
        assert!(both.contains("set one"), "{both}");
        let unreadable = auth(&[(ENV_REGISTRY_TOKEN_FILE, "/nope")], &[]).unwrap_err();
        assert!(unreadable.contains("/nope"), "{unreadable}");
    }
}
