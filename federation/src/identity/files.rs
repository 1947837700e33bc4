//! Reading PEM files and writing certificate and key files safely.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::IdentityError;

/// A certificate, its private key and the CA bundle to trust, as files: the one shape every
/// component's configuration and command line takes them in. The files are re-read when they
/// change (rotation), checked every `reload_interval` where a component polls.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// How often the files are checked for rotation (default 1 s).
    #[serde(default = "default_reload", with = "crate::config::duration_field")]
    pub reload_interval: std::time::Duration,
}

fn default_reload() -> std::time::Duration {
    std::time::Duration::from_secs(1)
}

impl TlsFiles {
    /// These files, checked every second.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>, ca: impl Into<PathBuf>) -> Self {
        Self {
            cert: cert.into(),
            key: key.into(),
            ca: ca.into(),
            reload_interval: default_reload(),
        }
    }

    /// The files `cert.pem`, `key.pem` and `ca.pem` of `dir` (the layout `strait pki issue`
    /// writes).
    pub fn in_dir(dir: &Path) -> Self {
        Self::new(
            dir.join("cert.pem"),
            dir.join("key.pem"),
            dir.join("ca.pem"),
        )
    }
}

/// File mode of private keys.
pub(crate) const KEY_MODE: u32 = 0o600;
/// File mode of certificates.
pub(crate) const CERT_MODE: u32 = 0o644;

fn io_error(path: &Path, error: std::io::Error) -> IdentityError {
    IdentityError::Io {
        path: path.to_owned(),
        error,
    }
}

fn bad_file(path: &Path, reason: impl Into<String>) -> IdentityError {
    IdentityError::BadFile {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Reads a whole text file; the error names the file.
pub(crate) fn read_text(path: &Path) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(|e| io_error(path, e))
}

/// Parses every `CERTIFICATE` block of `pem`, in order. Other blocks are skipped.
pub(crate) fn certs_from_pem(
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_file(path, format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad_file(path, "contains no PEM CERTIFICATE block"));
    }
    Ok(certs)
}

/// Loads the certificates of a PEM file (a chain: leaf first), with errors naming the file.
pub fn load_certs(path: impl AsRef<Path>) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let path = path.as_ref();
    let pem = fs::read(path).map_err(|e| io_error(path, e))?;
    certs_from_pem(path, &pem)
}

/// Loads the first private key (PKCS#8, SEC1 or PKCS#1) of a PEM file, with errors naming the
/// file.
pub fn load_private_key(path: impl AsRef<Path>) -> Result<PrivateKeyDer<'static>, IdentityError> {
    let path = path.as_ref();
    let pem = fs::read(path).map_err(|e| io_error(path, e))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            bad_file(path, "contains no PEM private key block")
        }
        other => bad_file(path, format!("invalid PEM private key: {other}")),
    })
}

/// Loads the certificates of a PEM file as trust anchors (e.g. the federation `ca.pem`).
pub fn load_roots(path: impl AsRef<Path>) -> Result<RootCertStore, IdentityError> {
    let path = path.as_ref();
    let certs = load_certs(path)?;
    roots_from(path, certs)
}

pub(crate) fn roots_from<'a>(
    origin: &Path,
    certs: impl IntoIterator<Item = CertificateDer<'a>>,
) -> Result<RootCertStore, IdentityError> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            bad_file(
                origin,
                format!("certificate #{} is not a usable trust anchor: {e}", i + 1),
            )
        })?;
    }
    if roots.is_empty() {
        return Err(bad_file(origin, "contains no trust anchor"));
    }
    Ok(roots)
}

/// Creates `dir` (and its parents) if needed.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), IdentityError> {
    fs::create_dir_all(dir).map_err(|e| io_error(dir, e))
}

/// Writes `contents` to `path` atomically with file mode `mode` (on Unix): the data goes to a
/// fresh temporary file in the same directory, created with that mode, which is then renamed
/// over `path`. A key file therefore never exists, even briefly, with looser permissions, and an
/// existing file is never left half-written.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| bad_file(path, "is not a file path"))?;
    let suffix: u64 = rand::random();
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{suffix:016x}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = write_new(&tmp, contents, mode)
        .and_then(|()| fs::rename(&tmp, path).map_err(|e| io_error(path, e)));
    if result.is_err() {
        // Best effort: the temporary file may not exist at all.
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(|e| io_error(path, e))?;
    #[cfg(unix)]
    {
        // The process umask may have removed bits from `mode` at creation; set it exactly.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| io_error(path, e))?;
    }
    file.write_all(contents).map_err(|e| io_error(path, e))?;
    file.sync_all().map_err(|e| io_error(path, e))
}

/// Logs a warning if a private key file can be read by group or others.
pub(crate) fn warn_if_key_exposed(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format_args!("{mode:o}"),
                    "private key file is accessible to group or others; it should be mode 600"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}
