//! HTTPS on the real server: `--tls-cert-file` and `--tls-key-file` (with HTTP/2 and HTTP/1.1
//! by ALPN), plain HTTP clients told to use https://, certificates renewed on disk without a
//! restart, and `--tls-client-ca-file`'s mutual TLS. The certificates are made per run (rcgen):
//! a CA, and certificates for `localhost` it signs.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use reqwest::blocking::{Client, ClientBuilder};
use serde_json::{json, Value};
use turbine::server::tls::TlsConfig;
use turbine::server::ServerConfig;

use super::{decode_b64, images, test_config, Receiver, TestServer};

/// A certificate authority and the files it issues, in a directory of the test's own.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

/// A certificate and its key, as PEM, and the certificate's DER.
struct Issued {
    cert: String,
    key: String,
    der: Vec<u8>,
}

impl Pki {
    fn new() -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        Pki {
            dir: tempfile::tempdir().unwrap(),
            ca,
            ca_key,
        }
    }

    /// A certificate for `localhost` that expires at the start of `year`.
    fn issue(&self, year: i32) -> Issued {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(year, 1, 1);
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `--tls-cert-file` and `--tls-key-file` for `issued`, written as cert.pem and key.pem.
    fn tls_config(&self, issued: &Issued) -> TlsConfig {
        TlsConfig::new(
            self.write("cert.pem", &issued.cert),
            self.write("key.pem", &issued.key),
        )
    }

    /// A client that trusts this CA only, and tells which certificate the server showed.
    fn client(&self) -> ClientBuilder {
        Client::builder()
            .timeout(Duration::from_secs(600))
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca.pem().as_bytes()).unwrap())
            .tls_info(true)
    }
}

fn start_https(config: ServerConfig, client: Client) -> TestServer {
    TestServer::start_as(
        config,
        vec![("cpu", Box::new(|p| Box::new(p)))],
        "https://localhost",
        client,
    )
}

/// The certificate the server showed on `client`'s (new) connection.
fn peer_certificate(s: &TestServer, client: &Client) -> Vec<u8> {
    let r = client.get(s.url("/health")).send().unwrap();
    assert_eq!(r.status(), 200);
    r.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|t| t.peer_certificate())
        .expect("the server showed a certificate")
        .to_vec()
}

fn port(s: &TestServer) -> u16 {
    s.base.rsplit(':').next().unwrap().parse().unwrap()
}

/// With a certificate the API is served over HTTPS, in HTTP/2 or HTTP/1.1 as the client's ALPN
/// asks, image URLs are `https://`, and a client given an `http://` URL gets a 400 in OpenAI's
/// shape that says which URL to use (not a cut connection). A client that does not trust the
/// certificate cannot connect, and `/metrics` counts both refusals and shows the certificate's
/// expiry.
#[test]
fn https_serves_the_api_over_http2_and_http1_and_tells_plain_http_clients() {
    let pki = Pki::new();
    let issued = pki.issue(2031);
    let mut config = test_config();
    config.tls = Some(pki.tls_config(&issued));
    let s = start_https(config, pki.client().build().unwrap());
    assert!(s.base.starts_with("https://localhost:"), "{}", s.base);

    // HTTP/2 (reqwest offers h2 first), an image as a URL on this server.
    let body = json!({"prompt": "a fox in snow", "seed": 7, "response_format": "url"});
    let r = s
        .client
        .post(s.url("/v1/images/generations"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let v: Value = r.json().unwrap();
    let url = v["data"][0]["url"].as_str().unwrap().to_string();
    assert!(
        url.starts_with(&format!("{}/v1/images/files/", s.base)),
        "{url}"
    );
    let png = s.client.get(&url).send().unwrap().bytes().unwrap();
    let by_url = image::load_from_memory(&png).unwrap().to_rgb8();

    // HTTP/1.1: the same image, as base64.
    let h1 = pki.client().http1_only().build().unwrap();
    let r = h1
        .post(s.url("/v1/images/generations"))
        .json(&json!({"prompt": "a fox in snow", "seed": 7}))
        .send()
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.status(), 200);
    let v: Value = r.json().unwrap();
    assert_eq!(images(&v), vec![by_url]);
    assert_eq!(decode_b64(&v["data"][0]).dimensions(), (64, 64));

    // Plain HTTP, from a real client and raw: told where to go.
    let plain = Client::new()
        .get(format!("http://127.0.0.1:{}/health", port(&s)))
        .send()
        .unwrap();
    assert_eq!(plain.status(), 400);
    let v: Value = plain.json().unwrap();
    assert_eq!(v["error"]["code"], "https_required");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["param"].is_null());
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", port(&s))).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let body = "{\"prompt\": \"a fox\"}";
    write!(
        raw,
        "POST /v1/images/generations HTTP/1.1\r\nHost: localhost:{}\r\nContent-Type: \
         application/json\r\nContent-Length: {}\r\n\r\n{body}",
        port(&s),
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let (_, json) = answer.split_once("\r\n\r\n").unwrap();
    let v: Value = serde_json::from_str(json).unwrap();
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "https://localhost:{}/v1/images/generations",
            port(&s)
        )),
        "{message}"
    );

    // A client that does not trust the certificate.
    let stranger = Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    assert!(stranger.get(s.url("/health")).send().is_err());
    s.wait_metric(
        "turbine_tls_connections_refused_total{reason=\"handshake\"}",
        |v| v >= 1.0,
    );
    let m = s.metrics();
    assert_eq!(
        super::metric_in(
            &m,
            "turbine_tls_connections_refused_total{reason=\"plain_http\"}"
        ),
        2.0
    );
    // 2031-01-01T00:00:00Z.
    assert_eq!(
        super::metric_in(&m, "turbine_tls_certificate_expiry_timestamp_seconds"),
        1_924_992_000.0
    );
}

/// A certificate renewed on disk is what new connections get, without a restart; a renewal
/// caught half-written (the certificate without its key) is refused and the old pair kept.
#[test]
fn a_renewed_certificate_is_used_without_a_restart() {
    let pki = Pki::new();
    let first = pki.issue(2031);
    let mut config = test_config();
    let tls = pki.tls_config(&first);
    let (cert_file, key_file) = (tls.cert_file.clone(), tls.key_file.clone());
    config.tls = Some(TlsConfig {
        reload_interval: Duration::from_millis(20),
        ..tls
    });
    let s = start_https(config, pki.client().build().unwrap());
    let fresh = || pki.client().build().unwrap();
    assert_eq!(peer_certificate(&s, &fresh()), first.der);

    let renewed = pki.issue(2032);
    std::fs::write(&cert_file, &renewed.cert).unwrap();
    s.wait_metric("turbine_tls_reloads_total{outcome=\"failed\"}", |v| {
        v >= 1.0
    });
    assert_eq!(peer_certificate(&s, &fresh()), first.der);

    std::fs::write(&key_file, &renewed.key).unwrap();
    s.wait_metric("turbine_tls_reloads_total{outcome=\"loaded\"}", |v| {
        v >= 1.0
    });
    assert_eq!(peer_certificate(&s, &fresh()), renewed.der);
    // 2032-01-01T00:00:00Z.
    assert_eq!(
        s.metric("turbine_tls_certificate_expiry_timestamp_seconds"),
        1_956_528_000.0
    );
    let v = s.generate_ok(&json!({"prompt": "renewed", "seed": 1}));
    assert_eq!(images(&v).len(), 1);
}

/// `--tls-client-ca-file`: only clients with a certificate from that CA get in.
#[test]
fn mutual_tls_admits_only_clients_with_a_certificate_from_the_client_ca() {
    let servers = Pki::new();
    let clients = Pki::new();
    let mut config = test_config();
    config.tls = Some(TlsConfig {
        client_ca_file: Some(clients.write("client-ca.pem", &clients.ca.pem())),
        ..servers.tls_config(&servers.issue(2031))
    });
    let identity = |issued: &Issued| {
        reqwest::Identity::from_pem(format!("{}{}", issued.cert, issued.key).as_bytes()).unwrap()
    };
    let member = clients.issue(2031);
    let s = start_https(
        config,
        servers
            .client()
            .identity(identity(&member))
            .build()
            .unwrap(),
    );
    let v = s.generate_ok(&json!({"prompt": "members only", "seed": 3}));
    assert_eq!(images(&v).len(), 1);

    for (what, client) in [
        ("no certificate", servers.client().build().unwrap()),
        (
            "a certificate from another CA",
            servers
                .client()
                .identity(identity(&servers.issue(2031)))
                .build()
                .unwrap(),
        ),
    ] {
        let r = client.get(s.url("/health")).send();
        assert!(r.is_err(), "{what}: {r:?}");
    }
    s.wait_metric(
        "turbine_tls_connections_refused_total{reason=\"handshake\"}",
        |v| v >= 2.0,
    );
}

/// The real binary: `--tls-cert-file`/`--tls-key-file` that do not load stop it at once with
/// the file at fault named (before the model loads); good ones serve HTTPS, and SIGHUP reloads
/// renewed files at once (without ending the process, SIGHUP's default).
#[test]
fn the_binary_checks_its_certificate_first_and_reloads_it_on_sighup() {
    use std::io::BufRead as _;
    use std::process::{Command, Stdio};

    let pki = Pki::new();
    let first = pki.issue(2031);
    let tls = pki.tls_config(&first);
    let serve = |cert: &std::path::Path, key: &std::path::Path| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_turbine"));
        c.args(["serve", "--model-dir"])
            .arg(super::model_dir())
            .args(["--device", "cpu", "--host", "127.0.0.1", "--port", "0"])
            .args(["--min-image-side", "64", "--default-size", "64x64"])
            .args(["--warmup-images", "1", "--tls-cert-file"])
            .arg(cert)
            .arg("--tls-key-file")
            .arg(key)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        c
    };

    let bad_key = pki.write("other-key.pem", &pki.issue(2031).key);
    let out = serve(&tls.cert_file, &bad_key).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "--tls-key-file {} is not the key of the certificate",
            bad_key.display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("listening"), "{stderr}");

    let mut child = serve(&tls.cert_file, &tls.key_file)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let child = Kill(child);
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            eprintln!("[server] {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |needle: &str| -> String {
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(300))
                .unwrap_or_else(|e| panic!("no log line with {needle:?}: {e}"));
            if line.contains(needle) {
                return line;
            }
        }
    };
    let line = wait_for("listening on https://");
    let port: u16 = line
        .rsplit(':')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{line}"));
    let base = format!("https://localhost:{port}");
    let health = |client: &Client| -> Option<Vec<u8>> {
        let r = client.get(format!("{base}/health")).send().ok()?;
        (r.status() == 200).then(|| {
            r.extensions()
                .get::<reqwest::tls::TlsInfo>()
                .and_then(|t| t.peer_certificate())
                .unwrap()
                .to_vec()
        })
    };
    let ready = loop {
        if let Some(cert) = health(&pki.client().build().unwrap()) {
            break cert;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(ready, first.der);

    let renewed = pki.issue(2032);
    std::fs::write(&tls.key_file, &renewed.key).unwrap();
    std::fs::write(&tls.cert_file, &renewed.cert).unwrap();
    let status = Command::new("kill")
        .args(["-HUP", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for("SIGHUP received");
    wait_for("certificate reloaded");
    assert_eq!(health(&pki.client().build().unwrap()), Some(renewed.der));
}

/// `--webhook-ca-file`: webhook deliveries trust the CAs in it besides the public ones, so an
/// endpoint on an internal HTTPS receiver, whose certificate a private CA signed, is reached;
/// without it, that endpoint is unreachable.
#[test]
fn webhooks_reach_receivers_whose_certificate_the_webhook_ca_file_signed() {
    use std::sync::Arc;
    use turbine::server::auth::ApiKey;

    let pki = Pki::new();
    let issued = pki.issue(2031);
    // The receiver speaks HTTP/1.1 only: no ALPN.
    let mut receiver_tls = (*turbine::server::tls::load(&pki.tls_config(&issued))
        .unwrap()
        .config)
        .clone();
    receiver_tls.alpn_protocols.clear();
    let receiver_tls = Arc::new(receiver_tls);
    let receiver = Receiver::start_on("https", vec![], move |tcp| {
        let conn = rustls::ServerConnection::new(receiver_tls.clone()).unwrap();
        Box::new(rustls::StreamOwned::new(conn, tcp))
    });
    assert!(receiver.url.starts_with("https://localhost:"));

    let ca_file = pki.write("webhook-ca.pem", &pki.ca.pem());
    for (ca, want) in [(None, 400), (Some(ca_file), 200)] {
        let mut config = test_config();
        config.auth.keys = vec![ApiKey::plain("sk-a")];
        config.files.webhook_ca_file = ca.clone();
        let s = TestServer::start(config);
        let (status, endpoint) = s.call(
            "POST",
            "/v1/webhook_endpoints",
            Some("sk-a"),
            Some(json!({"name": "internal", "url": receiver.url, "event_types": ["batch.completed"]})),
        );
        assert_eq!(status, 200, "{endpoint}");
        let id = endpoint["id"].as_str().unwrap();
        let (status, test) = s.call(
            "POST",
            &format!("/v1/webhook_endpoints/{id}/test"),
            Some("sk-a"),
            Some(json!({"event_type": "batch.completed"})),
        );
        assert_eq!(status, want, "with {ca:?}: {test}");
        if want == 200 {
            assert_eq!(test["status_code"], 200, "{test}");
            let got = receiver.wait_for(1);
            assert_eq!(got[0].event["type"], "batch.completed");
        } else {
            assert_eq!(test["error"]["code"], "webhook_unreachable", "{test}");
        }
    }
    assert_eq!(receiver.requests().len(), 1);
}

/// The handshake has `--header-read-timeout` (here 1 s): a connection that sends nothing is
/// closed and counted as a timeout; a plain HTTP client that stalls in its head is closed too,
/// and counted as plain HTTP only. (The reads wait for the server to close, 120 s at most.)
#[test]
fn connections_that_stall_before_the_handshake_are_closed_and_counted_once() {
    let pki = Pki::new();
    let mut config = test_config();
    config.limits.header_timeout = Duration::from_secs(1);
    config.tls = Some(pki.tls_config(&pki.issue(2031)));
    let s = start_https(config, pki.client().build().unwrap());
    let connect = || {
        let c = std::net::TcpStream::connect(("127.0.0.1", port(&s))).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        c
    };
    let until_closed = |mut c: std::net::TcpStream| {
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    };
    until_closed(connect());
    let mut half = connect();
    half.write_all(b"GET /health HTTP/1.1\r\nHost: local")
        .unwrap();
    until_closed(half);
    let m = s.metrics();
    let refused = |reason: &str| {
        super::metric_in(
            &m,
            &format!("turbine_tls_connections_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(
        (
            refused("timeout"),
            refused("plain_http"),
            refused("handshake")
        ),
        (1.0, 1.0, 0.0)
    );
}
