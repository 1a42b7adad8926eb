//! A small Hugging Face Hub look-alike on 127.0.0.1 for the download tests.
//!
//! It answers like huggingface.co does for what `turbine download` and `hf-hub` use:
//! - `GET /api/models/{owner}/{name}/revision/{rev}`: `{"id","sha","siblings":[{"rfilename"}]}`.
//! - `HEAD|GET /{owner}/{name}/resolve/{rev}/{path}`: for LFS files (`*.safetensors`) a 302 to
//!   a second server (another origin, like the Hub's CDN) with `X-Repo-Commit`,
//!   `X-Linked-Etag` (the SHA-256) and `X-Linked-Size`; for other files the bytes, with the
//!   git blob SHA-1 as `ETag` and `X-Repo-Commit`.
//! - `GET /cdn/{sha256}` on the CDN server: the bytes.
//!   Both honour `Range: bytes=a-` / `bytes=a-b` (206 + `Content-Range`, 416 past the end).
//! - Errors with the Hub's `X-Error-Code`: 401 for a gated repository without the right
//!   token (and, like the Hub, for unknown repositories when no token is sent), 404
//!   `RepoNotFound` / `RevisionNotFound` / `EntryNotFound`.
//!
//! Faults the tests switch on per file: break the connection half-way through (once), or
//! serve bytes that differ from the advertised hash. Every request is logged.

#![allow(dead_code)]

pub mod checkpoint;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, Request, Response, StatusCode};
use axum::Router;
use sha2::Digest;

#[derive(Debug, Clone)]
pub struct Logged {
    /// "hub" or "cdn".
    pub server: &'static str,
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

type Files = BTreeMap<String, Arc<Vec<u8>>>;

struct RepoFixture {
    commit: String,
    files: Files,
    token: Option<String>,
}

#[derive(Default)]
struct Faults {
    /// Files whose next GET breaks off after half of the bytes asked for.
    drop_half_once: HashSet<String>,
    /// Files served with one byte flipped (the advertised hash stays the true one).
    corrupt: HashSet<String>,
    /// The CDN answers nothing until released (a download under way).
    held: bool,
}

/// (repository path, bytes) of an LFS file.
type Blob = (String, Arc<Vec<u8>>);

#[derive(Default)]
struct Shared {
    repos: Mutex<HashMap<String, RepoFixture>>,
    /// sha256 -> (path, bytes), what the CDN serves.
    blobs: Mutex<HashMap<String, Blob>>,
    log: Mutex<Vec<Logged>>,
    faults: Mutex<Faults>,
    cdn: Mutex<String>,
    /// Notified when held downloads are released.
    released: tokio::sync::Notify,
}

pub struct FakeHub {
    /// What HF_ENDPOINT should be set to.
    pub endpoint: String,
    pub cdn: String,
    shared: Arc<Shared>,
    _runtime: tokio::runtime::Runtime,
}

#[derive(Clone)]
struct App {
    shared: Arc<Shared>,
    server: &'static str,
}

impl FakeHub {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// The Hub over HTTPS (its CDN stays plain HTTP), with this certificate and key (PEM) for
    /// `localhost`: `endpoint` is `https://localhost:PORT`.
    pub fn start_https(cert: &str, key: &str) -> Self {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        Self::start_with(Some(Arc::new(config)))
    }

    fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let shared = Arc::new(Shared::default());
        let (endpoint, cdn) = runtime.block_on(async {
            let hub = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let cdn = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let endpoint = match &tls {
                Some(_) => format!("https://localhost:{}", hub.local_addr().unwrap().port()),
                None => format!("http://{}", hub.local_addr().unwrap()),
            };
            let cdn_url = format!("http://{}", cdn.local_addr().unwrap());
            for (listener, server) in [(hub, "hub"), (cdn, "cdn")] {
                let app = Router::new().fallback(handle).with_state(App {
                    shared: shared.clone(),
                    server,
                });
                match (&tls, server) {
                    (Some(config), "hub") => {
                        tokio::spawn(serve_tls(listener, app, config.clone()));
                    }
                    _ => {
                        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
                    }
                }
            }
            (endpoint, cdn_url)
        });
        *shared.cdn.lock().unwrap() = cdn.clone();
        Self {
            endpoint,
            cdn,
            shared,
            _runtime: runtime,
        }
    }

    /// Serves `files` as repository `repo`; returns its commit hash. With `token`, every
    /// request for the repository needs `Authorization: Bearer <token>`.
    pub fn add_repo(
        &self,
        repo: &str,
        files: BTreeMap<String, Vec<u8>>,
        token: Option<&str>,
    ) -> String {
        let mut h = sha1::Sha1::new();
        h.update(repo.as_bytes());
        for (name, bytes) in &files {
            h.update(name.as_bytes());
            h.update(bytes);
        }
        let commit = hex::encode(h.finalize());
        let files: Files = files.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        {
            let mut blobs = self.shared.blobs.lock().unwrap();
            for (name, bytes) in &files {
                blobs.insert(sha256_hex(bytes), (name.clone(), bytes.clone()));
            }
        }
        self.shared.repos.lock().unwrap().insert(
            repo.to_string(),
            RepoFixture {
                commit: commit.clone(),
                files,
                token: token.map(str::to_string),
            },
        );
        commit
    }

    pub fn drop_half_once(&self, file: &str) {
        self.shared
            .faults
            .lock()
            .unwrap()
            .drop_half_once
            .insert(file.to_string());
    }

    pub fn corrupt(&self, file: &str) {
        self.shared
            .faults
            .lock()
            .unwrap()
            .corrupt
            .insert(file.to_string());
    }

    /// Holds the CDN's answers (the files' bytes) until [`FakeHub::release_files`].
    pub fn hold_files(&self) {
        self.shared.faults.lock().unwrap().held = true;
    }

    pub fn release_files(&self) {
        self.shared.faults.lock().unwrap().held = false;
        self.shared.released.notify_waiters();
    }

    pub fn clear_faults(&self) {
        *self.shared.faults.lock().unwrap() = Faults::default();
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.shared.log.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.shared.log.lock().unwrap().len()
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

pub fn git_blob_sha1(bytes: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    hex::encode(h.finalize())
}

/// Every file under `dir`, by path relative to it with `/` separators.
pub fn read_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.file_name().is_some_and(|n| n == ".turbine-download.lock") {
                // The empty advisory lock file of a download, not content.
            } else {
                let rel = p
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The committed tiny random model (diffusers layout), without the `--vae taesdxl` extra kept
/// beside it (`vae-taesdxl/`: a repository of its own on the Hub).
pub fn tiny_model() -> BTreeMap<String, Vec<u8>> {
    let mut files = read_tree(&fixture_dir());
    files.retain(|name, _| !name.starts_with("vae-taesdxl/"));
    files
}

pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl")
}

/// The tiny model under the file names of stabilityai/sdxl-turbo's manifest (fp16 variants),
/// so the real manifest can be downloaded from the look-alike.
pub fn tiny_as_sdxl_turbo() -> BTreeMap<String, Vec<u8>> {
    tiny_model()
        .into_iter()
        .map(|(name, bytes)| {
            let name = if name.ends_with(".safetensors") && !name.contains(".fp16.") {
                name.replace(".safetensors", ".fp16.safetensors")
            } else {
                name
            };
            (name, bytes)
        })
        .collect()
}

/// The tiny TAESD laid out like madebyollin/taesdxl.
pub fn tiny_taesd() -> BTreeMap<String, Vec<u8>> {
    read_tree(&fixture_dir().join("vae-taesdxl"))
}

/// The tiny VAE laid out like madebyollin/sdxl-vae-fp16-fix.
pub fn tiny_vae_fix() -> BTreeMap<String, Vec<u8>> {
    let t = tiny_model();
    BTreeMap::from([
        ("config.json".to_string(), t["vae/config.json"].clone()),
        (
            "diffusion_pytorch_model.safetensors".to_string(),
            t["vae/diffusion_pytorch_model.safetensors"].clone(),
        ),
        ("README.md".to_string(), b"# not downloaded\n".to_vec()),
    ])
}

fn status(code: StatusCode, error_code: &str, message: &str) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("x-error-code", error_code)
        .header("x-error-message", message)
        .body(Body::from(format!("{{\"error\":\"{message}\"}}")))
        .unwrap()
}

/// `app` over TLS: each connection's handshake, then HTTP/1.1 or HTTP/2 as it chose.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    config: Arc<rustls::ServerConfig>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            // A client that refuses the certificate ends here.
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(tls),
                        hyper_util::service::TowerToHyperService::new(app),
                    )
                    .await;
        });
    }
}

fn percent_decode(s: &str) -> String {
    s.replace("%2F", "/").replace("%2f", "/")
}

async fn handle(State(app): State<App>, req: Request<Body>) -> Response<Body> {
    let headers = req.headers().clone();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let get = |n: header::HeaderName| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    app.shared.log.lock().unwrap().push(Logged {
        server: app.server,
        method: method.to_string(),
        path: path.clone(),
        range: get(header::RANGE),
        authorization: get(header::AUTHORIZATION),
    });
    if app.server == "cdn" {
        loop {
            let released = app.shared.released.notified();
            if !app.shared.faults.lock().unwrap().held {
                break;
            }
            released.await;
        }
        return cdn(&app.shared, &method, &headers, &path);
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if parts.len() == 6 && parts[0] == "api" && parts[1] == "models" && parts[4] == "revision" {
        let repo = format!("{}/{}", parts[2], parts[3]);
        return api_info(&app.shared, &headers, &repo, &percent_decode(parts[5]));
    }
    if parts.len() >= 5 && parts[2] == "resolve" {
        let repo = format!("{}/{}", parts[0], parts[1]);
        let file = parts[4..].join("/");
        return resolve(
            &app.shared,
            &method,
            &headers,
            &repo,
            &percent_decode(parts[3]),
            &file,
        );
    }
    status(StatusCode::NOT_FOUND, "NotFound", "no such route")
}

/// Checks the token and revision; the repository's commit and files when allowed.
#[allow(clippy::result_large_err)]
fn authorize(
    shared: &Shared,
    headers: &HeaderMap,
    repo: &str,
    rev: &str,
) -> Result<(String, Files), Response<Body>> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let repos = shared.repos.lock().unwrap();
    let Some(r) = repos.get(repo) else {
        // Like the Hub: without credentials an unknown repository is indistinguishable from
        // a private one (401); with credentials it is a 404.
        let code = if auth.is_some() {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::UNAUTHORIZED
        };
        return Err(status(code, "RepoNotFound", "Repository not found"));
    };
    if let Some(token) = &r.token {
        match auth {
            None => {
                return Err(status(
                    StatusCode::UNAUTHORIZED,
                    "GatedRepo",
                    &format!(
                        "Access to model {repo} is restricted. You must have access to it and \
                         be authenticated to access it. Please log in."
                    ),
                ))
            }
            Some(a) if a != format!("Bearer {token}") => {
                return Err(status(
                    StatusCode::UNAUTHORIZED,
                    "",
                    "Invalid credentials in Authorization header",
                ))
            }
            Some(_) => {}
        }
    }
    if rev != "main" && rev != r.commit {
        return Err(status(
            StatusCode::NOT_FOUND,
            "RevisionNotFound",
            &format!("Invalid rev id: {rev}"),
        ));
    }
    Ok((r.commit.clone(), r.files.clone()))
}

fn api_info(shared: &Shared, headers: &HeaderMap, repo: &str, rev: &str) -> Response<Body> {
    let (commit, files) = match authorize(shared, headers, repo, rev) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let siblings: Vec<serde_json::Value> = files
        .keys()
        .map(|f| serde_json::json!({ "rfilename": f }))
        .collect();
    let body = serde_json::json!({ "id": repo, "sha": commit, "siblings": siblings });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn resolve(
    shared: &Shared,
    method: &Method,
    headers: &HeaderMap,
    repo: &str,
    rev: &str,
    file: &str,
) -> Response<Body> {
    let (commit, files) = match authorize(shared, headers, repo, rev) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let Some(bytes) = files.get(file) else {
        return status(
            StatusCode::NOT_FOUND,
            "EntryNotFound",
            &format!("{file} does not exist on \"{rev}\""),
        );
    };
    if file.ends_with(".safetensors") {
        let sha = sha256_hex(bytes);
        let cdn = shared.cdn.lock().unwrap().clone();
        return Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, format!("{cdn}/cdn/{sha}"))
            .header("x-repo-commit", &commit)
            .header("x-linked-etag", format!("\"{sha}\""))
            .header("x-linked-size", bytes.len().to_string())
            .header(
                header::ETAG,
                format!("\"{}\"", git_blob_sha1(sha.as_bytes())),
            )
            .body(Body::empty())
            .unwrap();
    }
    let mut r = serve_bytes(shared, method, headers, file, bytes);
    let h = r.headers_mut();
    h.insert("x-repo-commit", commit.parse().unwrap());
    h.insert(
        header::ETAG,
        format!("\"{}\"", git_blob_sha1(bytes)).parse().unwrap(),
    );
    r
}

fn cdn(shared: &Shared, method: &Method, headers: &HeaderMap, path: &str) -> Response<Body> {
    let sha = path.trim_start_matches("/cdn/");
    let found = shared.blobs.lock().unwrap().get(sha).cloned();
    match found {
        Some((file, bytes)) => serve_bytes(shared, method, headers, &file, &bytes),
        None => status(StatusCode::NOT_FOUND, "", "no such blob"),
    }
}

/// The bytes of `file`, honouring Range, with the faults switched on for it.
fn serve_bytes(
    shared: &Shared,
    method: &Method,
    headers: &HeaderMap,
    file: &str,
    bytes: &Arc<Vec<u8>>,
) -> Response<Body> {
    let (corrupt, drop_half) = {
        let mut f = shared.faults.lock().unwrap();
        let drop = *method == Method::GET && f.drop_half_once.remove(file);
        (f.corrupt.contains(file), drop)
    };
    let mut data: Vec<u8> = bytes.as_ref().clone();
    if corrupt {
        let mid = data.len() / 2;
        data[mid] ^= 0xff;
    }
    let total = data.len();
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| {
            let (a, b) = r.split_once('-')?;
            let a: usize = a.parse().ok()?;
            let b: usize = if b.is_empty() {
                total.saturating_sub(1)
            } else {
                b.parse().ok()?
            };
            Some((a, b.min(total.saturating_sub(1))))
        });
    let mut builder = Response::builder().header(header::ACCEPT_RANGES, "bytes");
    let body_bytes = match range {
        Some((a, _)) if a >= total => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{total}"))
                .body(Body::empty())
                .unwrap();
        }
        Some((a, b)) => {
            builder = builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {a}-{b}/{total}"));
            data[a..=b].to_vec()
        }
        None => data,
    };
    let len = body_bytes.len();
    builder = builder.header(header::CONTENT_LENGTH, len.to_string());
    let body = if drop_half {
        // Half the bytes, a pause so they leave the socket buffer, then a broken body,
        // which makes hyper abort the connection mid-response.
        let half = body_bytes[..len / 2].to_vec();
        let stream = futures_util::stream::unfold(0u8, move |step| {
            let half = half.clone();
            async move {
                match step {
                    0 => Some((Ok(half), 1)),
                    1 => {
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        Some((
                            Err(std::io::Error::other("look-alike drops the connection")),
                            2,
                        ))
                    }
                    _ => None,
                }
            }
        });
        Body::from_stream(stream)
    } else {
        Body::from(body_bytes)
    };
    builder.body(body).unwrap()
}
