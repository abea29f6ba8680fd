//! Who may send events: named bearer tokens, several at once so that a token
//! can be rotated without a gap (add the new one, move the clients, remove
//! the old one). On a cluster they come from a Secret mounted as a directory,
//! one file per token, the file's name being the token's name; the directory
//! is read again when the kubelet updates it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use subtle::ConstantTimeEq;

/// A named token. Its `Debug` never shows the secret.
#[derive(Clone)]
struct Token {
    name: String,
    secret: Vec<u8>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({}, <redacted>)", self.name)
    }
}

/// What an `Authorization` header proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// No bearer token was presented.
    Missing,
    /// A bearer token that is none of this endpoint's.
    Unknown,
    /// The token of this name.
    Token(String),
    /// A token of the Secret that is not granted to this endpoint (one Secret
    /// shared by several pipelines): its name.
    NotGranted(String),
}

/// The tokens an endpoint admits; shared with the task that reloads them.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    tokens: Arc<RwLock<Vec<Token>>>,
    /// The names that may send; every token when `None`.
    granted: Option<Arc<BTreeSet<String>>>,
}

impl Tokens {
    /// Tokens given by name and secret (empty secrets are no credential).
    pub fn new(tokens: impl IntoIterator<Item = (String, String)>) -> Self {
        let set = Self::default();
        set.replace(tokens_of(tokens.into_iter().collect()));
        set
    }

    /// Only the tokens named in `granted` may send (the others are known,
    /// and refused as another pipeline's); every token when it is empty.
    pub fn granted(mut self, granted: &[String]) -> Self {
        self.granted = (!granted.is_empty()).then(|| Arc::new(granted.iter().cloned().collect()));
        self
    }

    /// Reads every token of `dir`: each regular file is a token named after
    /// the file (Kubernetes' `..data` links and other dot files are skipped).
    pub fn read_dir(dir: &Path) -> std::io::Result<Vec<(String, String)>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.path().is_file() {
                continue;
            }
            found.push((name, std::fs::read_to_string(entry.path())?));
        }
        found.sort();
        Ok(found)
    }

    /// The tokens of `dir`, read again every `every` so that a rotated Secret
    /// takes effect without a restart. A directory that cannot be read keeps
    /// the tokens last read.
    pub fn watch_dir(dir: PathBuf, every: Duration) -> std::io::Result<Self> {
        let tokens = Self::new(Self::read_dir(&dir)?);
        let reloaded = tokens.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                match Self::read_dir(&dir) {
                    Ok(found) => reloaded.replace(tokens_of(found)),
                    Err(error) => {
                        tracing::warn!(dir = %dir.display(), %error, "cannot read the ingest tokens; keeping the last ones read")
                    }
                }
            }
        });
        Ok(tokens)
    }

    fn replace(&self, tokens: Vec<Token>) {
        if let Ok(mut current) = self.tokens.write() {
            *current = tokens;
        }
    }

    /// The names of the tokens admitted now.
    pub fn names(&self) -> Vec<String> {
        self.tokens
            .read()
            .map(|t| t.iter().map(|t| t.name.clone()).collect())
            .unwrap_or_default()
    }

    /// Who an `Authorization` header value names. Every token is compared, in
    /// constant time, so that the time taken tells nothing about which
    /// matched or how much of one.
    pub fn identify(&self, authorization: Option<&[u8]>) -> Identity {
        let Some(presented) = authorization.and_then(bearer) else {
            return Identity::Missing;
        };
        let Ok(tokens) = self.tokens.read() else {
            return Identity::Unknown;
        };
        let mut found = None;
        for token in tokens.iter() {
            if bool::from(presented.ct_eq(&token.secret)) {
                found = Some(token.name.clone());
            }
        }
        match found {
            None => Identity::Unknown,
            Some(name) if self.granted.as_ref().is_some_and(|g| !g.contains(&name)) => {
                Identity::NotGranted(name)
            }
            Some(name) => Identity::Token(name),
        }
    }
}

/// The credential of a `Bearer` authorization (the scheme case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
        .filter(|token| !token.is_empty())
}

fn tokens_of(found: Vec<(String, String)>) -> Vec<Token> {
    found
        .into_iter()
        .filter_map(|(name, secret)| {
            let secret = secret.trim();
            (!secret.is_empty()).then(|| Token {
                name,
                secret: secret.as_bytes().to_vec(),
            })
        })
        .collect()
}
