//! Signing keys on disk: a private key is a base64 ed25519 seed in `<name>.key` (mode 0600,
//! never committed: `keys/*.key` is gitignored), its public half a base64 key in `<name>.pub`.
//!
//! Where it stands: `keygen` writes them, `export` and `serve` sign manifests with the private
//! key, gateways list the public keys they trust in their config.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use diredi_protocol::manifest::{PublicKey, SigningKey};

/// Paths of a key pair whose stem is `stem` (`keys/dev-signing` → `.key` and `.pub`).
pub fn pair_paths(stem: &Path) -> (PathBuf, PathBuf) {
    (stem.with_extension("key"), stem.with_extension("pub"))
}

/// Writes a new key pair; refuses to overwrite an existing private key unless `force`.
pub fn generate(stem: &Path, force: bool) -> Result<PublicKey> {
    let (key_path, pub_path) = pair_paths(stem);
    if key_path.exists() && !force {
        bail!(
            "{} exists; pass --force to replace it (models signed with it will no longer verify on gateways that do not also trust the new key)",
            key_path.display()
        );
    }
    if let Some(dir) = key_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let key = SigningKey::generate().context("generating an ed25519 key")?;
    write_private(&key_path, &key.to_base64())?;
    let public = key.public();
    fs::write(&pub_path, format!("{}\n", public.to_base64()))
        .with_context(|| format!("writing {}", pub_path.display()))?;
    Ok(public)
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(f, "{text}").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Reads a private key file.
pub fn load_private(path: &Path) -> Result<SigningKey> {
    let text = fs::read_to_string(path).with_context(|| {
        format!(
            "reading signing key {} (create a development key with `diredi-cloud-worker keygen`)",
            path.display()
        )
    })?;
    SigningKey::from_base64(text.trim()).with_context(|| format!("parsing {}", path.display()))
}

/// Loads the private key at `path`, generating a development pair there first if missing.
pub fn load_or_generate(path: &Path) -> Result<SigningKey> {
    if !path.exists() {
        let public = generate(&path.with_extension(""), false)?;
        tracing::warn!(
            key = %path.display(),
            key_id = %public.key_id(),
            "Generated a development signing key; gateways must list its public key to accept models signed with it."
        );
    }
    load_private(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_round_trips_and_is_private() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let stem = dir.path().join("k/dev");
        let public = generate(&stem, false)?;
        let key = load_private(&stem.with_extension("key"))?;
        assert_eq!(key.public().to_base64(), public.to_base64());
        let pub_text = fs::read_to_string(stem.with_extension("pub"))?;
        assert_eq!(
            PublicKey::from_base64(pub_text.trim())?.key_id(),
            key.key_id()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(stem.with_extension("key"))?
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(generate(&stem, false).is_err(), "must not overwrite");
        Ok(())
    }
}
