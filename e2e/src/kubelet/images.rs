//! Image -> local binary mapping: there is no container runtime, so an image
//! stands for a binary built in this workspace.

use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
#[error("invalid --image mapping {0:?}: expected PREFIX=/path/to/binary")]
pub struct InvalidMapping(pub String);

/// Ordered image prefix -> binary mappings; the longest matching prefix wins.
#[derive(Debug, Clone, Default)]
pub struct ImageMap {
    entries: Vec<(String, PathBuf)>,
}

impl ImageMap {
    /// Parses `PREFIX=/path` entries.
    pub fn parse<I, S>(specs: I) -> Result<Self, InvalidMapping>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut entries = Vec::new();
        for spec in specs {
            let spec = spec.as_ref();
            let (prefix, path) = spec
                .split_once('=')
                .filter(|(p, b)| !p.is_empty() && !b.is_empty())
                .ok_or_else(|| InvalidMapping(spec.to_owned()))?;
            entries.push((prefix.to_owned(), PathBuf::from(path)));
        }
        // Longest prefix first, so `keystone/runtime-debug` can override
        // `keystone/runtime`.
        entries.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Ok(Self { entries })
    }

    /// The binary an image runs, if mapped. The prefix must end at a
    /// boundary (`:`, `@`, `/` or the end) so `keystone/run` does not match
    /// `keystone/runtime`.
    pub fn resolve(&self, image: &str) -> Option<&Path> {
        // Registries are not modelled: `docker.io/keystone/runtime:1` and
        // `keystone/runtime:1` are the same image here.
        let candidates = [image, strip_registry(image)];
        self.entries.iter().find_map(|(prefix, path)| {
            candidates
                .iter()
                .any(|img| {
                    img.strip_prefix(prefix.as_str()).is_some_and(|rest| {
                        rest.is_empty()
                            || prefix.ends_with(['/', ':', '@'])
                            || rest.starts_with([':', '@', '/'])
                    })
                })
                .then_some(path.as_path())
        })
    }

    pub fn entries(&self) -> impl Iterator<Item = (&str, &Path)> {
        self.entries.iter().map(|(p, b)| (p.as_str(), b.as_path()))
    }
}

fn strip_registry(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => rest,
        _ => image,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_at_a_boundary_wins() {
        let map = ImageMap::parse([
            "keystone/runtime=/bin/rt",
            "keystone/runtime-debug=/bin/rtd",
            "keystone/run=/bin/nope",
        ])
        .unwrap();
        assert_eq!(
            map.resolve("keystone/runtime:dev"),
            Some(Path::new("/bin/rt"))
        );
        assert_eq!(map.resolve("keystone/runtime"), Some(Path::new("/bin/rt")));
        assert_eq!(
            map.resolve("ghcr.io/keystone/runtime@sha256:ab"),
            Some(Path::new("/bin/rt"))
        );
        assert_eq!(
            map.resolve("keystone/runtime-debug:1"),
            Some(Path::new("/bin/rtd"))
        );
        assert_eq!(map.resolve("keystone/runner:1"), None);
        assert_eq!(map.resolve("nginx:1"), None);
    }

    #[test]
    fn rejects_malformed_mappings() {
        assert!(ImageMap::parse(["keystone/runtime"]).is_err());
        assert!(ImageMap::parse(["=/bin/x"]).is_err());
    }
}
