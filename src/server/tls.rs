//! HTTPS without a proxy: `--tls-cert-file` and `--tls-key-file` (and `--tls-client-ca-file`
//! for clients that must show a certificate). A gateway on another machine sends its API key in
//! every request's headers; over plain HTTP anyone on the path reads it.
//!
//! The files are read at start (a bad pair stops the server before it loads the model, with a
//! message naming the file at fault) and again whenever they change on disk (checked every
//! [`TlsConfig::reload_interval`], and on SIGHUP): a renewed certificate (certbot, cert-manager's
//! mounted secret) is used by the next connections without a restart. A changed pair that does
//! not load (the certificate written, its key not yet) is logged and the previous pair kept.
//!
//! ALPN offers `h2` and `http/1.1`; each connection is served in the protocol it chose.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use super::metrics::{Metrics, TlsReload};

/// Where the certificate, its key and (optionally) the client CA are.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM: the server's certificate first, then the chain up to (not including) the root.
    pub cert_file: PathBuf,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key_file: PathBuf,
    /// PEM: the CA certificates that sign the clients' certificates. `Some`: a client must
    /// present a certificate signed by one of them (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
    /// How often the files are checked for changes.
    pub reload_interval: Duration,
}

/// How often the files are looked at (read and compared with what was loaded): a renewed certificate is used within this.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// Certificates expiring sooner than this are warned about when loaded.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

impl TlsConfig {
    pub fn new(cert_file: impl Into<PathBuf>, key_file: impl Into<PathBuf>) -> Self {
        TlsConfig {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            client_ca_file: None,
            reload_interval: RELOAD_INTERVAL,
        }
    }
}

/// What the files held when they were read: a few KB, compared whole when they are looked at
/// again (not by modification time, which a file rewritten within the same clock tick, a few
/// ms, may keep). Reads follow links, so a Kubernetes secret's swapped `..data` link shows as a
/// change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pem {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

fn read_files(config: &TlsConfig) -> anyhow::Result<Pem> {
    Ok(Pem {
        cert: read(&config.cert_file, "--tls-cert-file")?,
        key: read(&config.key_file, "--tls-key-file")?,
        client_ca: match &config.client_ca_file {
            Some(path) => Some(read(path, "--tls-client-ca-file")?),
            None => None,
        },
    })
}

/// A loaded pair: what connections are accepted with.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Arc<rustls::ServerConfig>,
    /// The server certificate's `notAfter`, Unix seconds (`None`: not readable from its DER).
    pub not_after: Option<i64>,
}

/// The files loaded into a rustls configuration. Errors name the option and file at fault.
pub fn load(config: &TlsConfig) -> anyhow::Result<Loaded> {
    parse(config, &read_files(config)?)
}

/// [`load`] of what the files held.
fn parse(config: &TlsConfig, pem: &Pem) -> anyhow::Result<Loaded> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = parse_certs(&pem.cert, &config.cert_file, "--tls-cert-file")?;
    let not_after = not_after(&certs[0]);
    let key = PrivateKeyDer::from_pem_slice(&pem.key).map_err(|e| match e {
        pem::Error::NoItemsFound => anyhow::anyhow!(
            "--tls-key-file {}: no private key in it (expected a PEM block BEGIN PRIVATE KEY, \
             BEGIN RSA PRIVATE KEY or BEGIN EC PRIVATE KEY)",
            config.key_file.display()
        ),
        e => anyhow::anyhow!(
            "--tls-key-file {}: not a readable PEM file: {e}",
            config.key_file.display()
        ),
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("the TLS provider supports no safe protocol version (this is a bug)")?;
    let builder = match (&config.client_ca_file, &pem.client_ca) {
        (Some(path), Some(ca)) => {
            let mut roots = RootCertStore::empty();
            for cert in parse_certs(ca, path, "--tls-client-ca-file")? {
                roots.add(cert).map_err(|e| {
                    anyhow::anyhow!(
                        "--tls-client-ca-file {}: a certificate in it is not usable as a CA: {e}",
                        path.display()
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| anyhow::anyhow!("--tls-client-ca-file {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut server = builder.with_single_cert(certs, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => anyhow::anyhow!(
            "--tls-key-file {} is not the key of the certificate in --tls-cert-file {} (the \
             certificate must come first in its file)",
            config.key_file.display(),
            config.cert_file.display()
        ),
        e => anyhow::anyhow!(
            "--tls-key-file {}: the key cannot be used: {e}",
            config.key_file.display()
        ),
    })?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Loaded {
        config: Arc::new(server),
        not_after,
    })
}

fn read(path: &Path, option: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{option} {}: cannot read it", path.display()))
}

/// The certificates of a PEM file's `bytes` (`option`'s `path`, for the errors).
fn parse_certs(
    bytes: &[u8],
    path: &Path,
    option: &str,
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            anyhow::anyhow!("{option} {}: not a readable PEM file: {e}", path.display())
        })?;
    if certs.is_empty() {
        bail!(
            "{option} {}: no certificate in it (expected PEM blocks BEGIN CERTIFICATE)",
            path.display()
        );
    }
    Ok(certs)
}

/// The live TLS state: the pair in use, reloaded when its files change.
pub struct Tls {
    config: TlsConfig,
    current: RwLock<Arc<rustls::ServerConfig>>,
    /// What the files held when last read (`None`: one could not be read).
    seen: Mutex<Option<Pem>>,
    metrics: Arc<Metrics>,
}

impl Tls {
    /// Loads the files (errors as [`load`]).
    pub fn new(config: TlsConfig, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let pem = read_files(&config)?;
        let loaded = parse(&config, &pem)?;
        report(&config, &loaded, &metrics, "HTTPS: certificate loaded");
        Ok(Tls {
            current: RwLock::new(loaded.config),
            seen: Mutex::new(Some(pem)),
            config,
            metrics,
        })
    }

    /// What the next connection is accepted with.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self.current.read().unwrap_or_else(|p| p.into_inner());
        tokio_rustls::TlsAcceptor::from(config.clone())
    }

    /// Loads the files again if any changed since they were last looked at (`force`: in any
    /// case). Returns whether a new pair is in use.
    pub fn reload(&self, force: bool) -> bool {
        let read = read_files(&self.config);
        {
            let now = read.as_ref().ok();
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if !force && seen.as_ref() == now {
                return false;
            }
            // A pair that fails is not tried again until a file changes once more: one warning
            // per change, not one per tick.
            *seen = now.cloned();
        }
        match read.and_then(|pem| parse(&self.config, &pem)) {
            Ok(loaded) => {
                // In use before it is said to be: a client that connects on reading the log
                // line gets the new certificate.
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = loaded.config.clone();
                report(
                    &self.config,
                    &loaded,
                    &self.metrics,
                    "HTTPS: certificate reloaded; new connections use it",
                );
                self.metrics.tls_reload(TlsReload::Loaded);
                true
            }
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "HTTPS: the changed certificate files do not load; still using the previous \
                     ones"
                );
                self.metrics.tls_reload(TlsReload::Failed);
                false
            }
        }
    }

    /// Checks the files every `reload_interval` (SIGHUP: see `server::reload_on_hangup`); runs
    /// until dropped.
    pub async fn watch(self: Arc<Self>) {
        super::every(self.config.reload_interval, || {
            self.reload_off_thread(false)
        })
        .await
    }

    /// [`Self::reload`] off the async workers (a few small reads all the same).
    pub async fn reload_off_thread(self: &Arc<Self>, force: bool) {
        let tls = self.clone();
        let _ = tokio::task::spawn_blocking(move || tls.reload(force)).await;
    }
}

fn report(config: &TlsConfig, loaded: &Loaded, metrics: &Metrics, what: &str) {
    let now = super::files::unix_now() as i64;
    metrics.tls_not_after(loaded.not_after);
    let client_ca = config
        .client_ca_file
        .as_ref()
        .map(|p| p.display().to_string());
    // Whether to warn, and what to say of the expiry.
    let (warn, expiry) = match loaded.not_after {
        Some(t) if t <= now => (
            true,
            format!(
                ", but it expired {} days ago: clients that check certificates will refuse it",
                (now - t) / 86_400
            ),
        ),
        Some(t) if t - now < EXPIRY_WARNING.as_secs() as i64 => {
            (true, format!("; it expires in {} hours", (t - now) / 3600))
        }
        Some(t) => (
            false,
            format!("; it expires in {} days", (t - now) / 86_400),
        ),
        None => (false, String::new()),
    };
    let cert = config.cert_file.display();
    if warn {
        tracing::warn!(cert = %cert, client_ca, "{what}{expiry}");
    } else {
        tracing::info!(cert = %cert, client_ca, "{what}{expiry}");
    }
}

/// The `notAfter` of an X.509 certificate, as Unix seconds: `Certificate ::= SEQUENCE {
/// tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber, signature, issuer, validity
/// SEQUENCE { notBefore, notAfter }, ... }, ... }` (RFC 5280 4.1). `None` if the DER is not
/// shaped so.
pub fn not_after(cert: &[u8]) -> Option<i64> {
    let (tag, cert, _) = der_item(cert)?;
    (tag == 0x30).then_some(())?;
    let (tag, mut tbs, _) = der_item(cert)?;
    (tag == 0x30).then_some(())?;
    let mut item = der_item(tbs)?;
    if item.0 == 0xa0 {
        tbs = item.2;
        item = der_item(tbs)?;
    }
    // serialNumber, signature, issuer, then validity.
    for expected in [0x02, 0x30, 0x30] {
        (item.0 == expected).then_some(())?;
        tbs = item.2;
        item = der_item(tbs)?;
    }
    let (tag, validity, _) = item;
    (tag == 0x30).then_some(())?;
    let (_, _, rest) = der_item(validity)?;
    let (tag, time, _) = der_item(rest)?;
    let text = std::str::from_utf8(time).ok()?;
    let (year, rest) = match tag {
        // UTCTime, YYMMDDHHMMSSZ: 50-99 are 19xx (RFC 5280 4.1.2.5.1).
        0x17 => {
            let yy: i64 = text.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        // GeneralizedTime, YYYYMMDDHHMMSSZ.
        0x18 => (text.get(..4)?.parse().ok()?, &text[4..]),
        _ => return None,
    };
    if rest.len() != 11 || !rest.ends_with('Z') {
        return None;
    }
    let field = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (month, day) = (field(0)?, field(2)?);
    let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// One DER item at the start of `der`: (tag, contents, the rest after it).
fn der_item(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        rest = &rest[n..];
        len
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA and a `localhost` certificate it signed, expiring at `not_after` (y, m, d).
    fn pair(not_after: (i32, u8, u8)) -> (rcgen::Certificate, rcgen::KeyPair) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        (params.signed_by(&key, &ca, &ca_key).unwrap(), key)
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn not_after_reads_utc_and_generalized_times() {
        // UTCTime up to 2049, GeneralizedTime from 2050 (RFC 5280 4.1.2.5).
        for (date, unix) in [
            ((2031, 1, 1), 1_924_992_000),
            ((2049, 12, 31), 2_524_521_600),
            ((2050, 1, 1), 2_524_608_000),
            ((2100, 3, 1), 4_107_542_400),
        ] {
            let (cert, _) = pair(date);
            assert_eq!(not_after(cert.der()), Some(unix), "{date:?}");
        }
    }

    #[test]
    fn a_good_pair_loads_and_bad_files_name_their_option() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair((2031, 1, 1));
        let (other, other_key) = pair((2031, 1, 1));
        let cert_file = write(dir.path(), "cert.pem", &cert.pem());
        let key_file = write(dir.path(), "key.pem", &key.serialize_pem());
        let loaded = load(&TlsConfig::new(&cert_file, &key_file)).unwrap();
        assert_eq!(loaded.not_after, Some(1_924_992_000));
        assert_eq!(
            loaded.config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );

        let other_file = write(dir.path(), "other.pem", &other.pem());
        let other_key_file = write(dir.path(), "other-key.pem", &other_key.serialize_pem());
        let garbage = write(dir.path(), "garbage.pem", "hello\n");
        let broken = write(
            dir.path(),
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n",
        );
        let missing = dir.path().join("missing.pem");
        let cases: Vec<(TlsConfig, &str)> = vec![
            (
                TlsConfig::new(&missing, &key_file),
                "--tls-cert-file {missing}: cannot read it",
            ),
            (
                TlsConfig::new(&cert_file, &missing),
                "--tls-key-file {missing}: cannot read it",
            ),
            (
                TlsConfig::new(&garbage, &key_file),
                "--tls-cert-file {garbage}: no certificate in it",
            ),
            (
                TlsConfig::new(&broken, &key_file),
                "--tls-cert-file {broken}: not a readable PEM file",
            ),
            (
                TlsConfig::new(&cert_file, &garbage),
                "--tls-key-file {garbage}: no private key in it",
            ),
            // The certificate's file handed over as the key.
            (
                TlsConfig::new(&cert_file, &cert_file),
                "--tls-key-file {cert}: no private key in it",
            ),
            (
                TlsConfig::new(&cert_file, &other_key_file),
                "--tls-key-file {other_key} is not the key of the certificate in \
                 --tls-cert-file {cert}",
            ),
            (
                TlsConfig {
                    client_ca_file: Some(garbage.clone()),
                    ..TlsConfig::new(&cert_file, &key_file)
                },
                "--tls-client-ca-file {garbage}: no certificate in it",
            ),
        ];
        let name = |p: &Path| p.display().to_string();
        for (config, want) in cases {
            let want = want
                .replace("{missing}", &name(&missing))
                .replace("{garbage}", &name(&garbage))
                .replace("{broken}", &name(&broken))
                .replace("{cert}", &name(&cert_file))
                .replace("{other_key}", &name(&other_key_file));
            let err = format!("{:#}", load(&config).unwrap_err());
            assert!(err.starts_with(&want), "want {want:?}, got {err:?}");
        }
        // A leaf certificate as the client CA loads (webpki takes any certificate as an anchor);
        // the other pair still loads as a pair.
        load(&TlsConfig {
            client_ca_file: Some(other_file.clone()),
            ..TlsConfig::new(&other_file, &other_key_file)
        })
        .unwrap();
    }

    #[test]
    fn reload_swaps_in_a_changed_pair_and_keeps_the_old_one_when_it_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair((2031, 1, 1));
        let cert_file = write(dir.path(), "cert.pem", &cert.pem());
        let key_file = write(dir.path(), "key.pem", &key.serialize_pem());
        let metrics = Arc::new(Metrics::new());
        let tls = Tls::new(TlsConfig::new(&cert_file, &key_file), metrics.clone()).unwrap();
        let first = Arc::as_ptr(&tls.acceptor().config().clone());
        assert!(!tls.reload(false), "nothing changed");
        assert_eq!(Arc::as_ptr(&tls.acceptor().config().clone()), first);
        let gauge = |m: &Metrics| {
            m.render()
                .lines()
                .find_map(|l| {
                    l.strip_prefix("turbine_tls_certificate_expiry_timestamp_seconds ")
                        .map(str::to_string)
                })
                .unwrap()
        };
        assert_eq!(gauge(&metrics), "1924992000");

        // A new certificate whose key is not written yet: the old pair stays.
        let (renewed, renewed_key) = pair((2032, 1, 1));
        std::fs::write(&cert_file, renewed.pem()).unwrap();
        assert!(!tls.reload(false));
        assert_eq!(Arc::as_ptr(&tls.acceptor().config().clone()), first);
        assert!(metrics
            .render()
            .contains("turbine_tls_reloads_total{outcome=\"failed\"} 1"));
        // Not retried until a file changes again.
        assert!(!tls.reload(false));
        assert!(metrics
            .render()
            .contains("turbine_tls_reloads_total{outcome=\"failed\"} 1"));

        std::fs::write(&key_file, renewed_key.serialize_pem()).unwrap();
        assert!(tls.reload(false));
        assert_ne!(Arc::as_ptr(&tls.acceptor().config().clone()), first);
        assert!(metrics
            .render()
            .contains("turbine_tls_reloads_total{outcome=\"loaded\"} 1"));
        assert_eq!(gauge(&metrics), "1956528000");
        // SIGHUP's forced reload loads even an unchanged pair.
        assert!(tls.reload(true));
    }

    #[test]
    fn days_from_civil_matches_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        // 2026-11-30T00:00:00Z = 1795996800 (`date -u -d 2026-11-30 +%s`).
        assert_eq!(days_from_civil(2026, 11, 30) * 86_400, 1_795_996_800);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
    }

    #[test]
    fn der_items_refuse_truncation() {
        assert_eq!(
            der_item(&[0x02, 0x01, 0x05, 0xff]),
            Some((0x02, &[0x05][..], &[0xff][..]))
        );
        assert_eq!(der_item(&[0x02, 0x02, 0x05]), None);
        assert_eq!(
            der_item(&[0x04, 0x81, 0x01, 0x07]),
            Some((0x04, &[0x07][..], &[][..]))
        );
        assert_eq!(der_item(&[0x04, 0x85, 0, 0, 0, 0, 1]), None);
        assert_eq!(der_item(&[0x04]), None);
        assert_eq!(not_after(&[0x30, 0x00]), None);
        assert_eq!(not_after(b"not a certificate at all"), None);
    }
}
