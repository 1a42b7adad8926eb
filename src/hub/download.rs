//! Fetching a [`Plan`] from the Hugging Face Hub (or a mirror) into its model directory.
//!
//! What `hf-hub` 0.4 gives is used: the endpoint (`HF_ENDPOINT`), the token file under
//! `HF_HOME`, repository / revision URL building and the repository-info call that resolves a
//! revision to a commit and lists its files. Its own `download` is not used: it writes into the
//! Hub cache layout (blobs + symlinks) instead of the diffusers folder the loader reads, keeps
//! each 10 MB chunk in memory, checks no hash, and its `metadata` (commit, ETag, size) is
//! private. So, like Python's `huggingface_hub`, each file gets a `HEAD` on
//! `{endpoint}/{repo}/resolve/{commit}/{path}` (following only same-origin redirects, so the
//! `X-Linked-Etag` / `X-Linked-Size` of an LFS file's redirect are seen), then a `GET` that may
//! carry `Range: bytes=N-` to resume `<path>.incomplete`. The bytes are hashed as they arrive;
//! the file is renamed into place only when its hash matches what the Hub advertised: SHA-256
//! for LFS files (their ETag; Xet-backed files keep it), the git blob SHA-1 for small files.
//!
//! The token is sent only to the endpoint's own origin, never to the CDN an LFS file redirects
//! to (signed URLs there reject a second credential).

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hf_hub::api::tokio::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::header::{HeaderMap, ACCEPT_ENCODING, CONTENT_RANGE, LOCATION, RANGE};
use reqwest::{Method, StatusCode, Url};
use sha2::Digest;

use super::error::{error_chain, human_bytes, HubError, TokenSource};
use super::lock::{Lock, LockedFile, LockedRepo};
use super::manifest::{check_relative_path, select_diffusers_files, Plan, Source};

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How to reach the Hub: endpoint, credentials, and the download's patience.
#[derive(Clone)]
pub struct HubConfig {
    /// Base URL without a trailing slash (`HF_ENDPOINT`, default <https://huggingface.co>).
    pub endpoint: String,
    pub token: Option<String>,
    pub token_source: TokenSource,
    /// `HF_HUB_OFFLINE=1`: behave as if `--offline` was given.
    pub offline: bool,
    /// Draw progress bars (on stderr); off when stderr is not a terminal.
    pub progress: bool,
    /// Extra attempts per file after a dropped connection or a 5xx/429, each resuming.
    pub retries: u32,
    /// First wait between attempts; doubles each time, capped at 30 s.
    pub retry_delay: Duration,
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a response (not for the whole file).
    pub read_timeout: Duration,
    /// `HF_HOME` (default `~/.cache/huggingface`): where `huggingface-cli login` keeps the token.
    pub hf_home: PathBuf,
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("token_source", &self.token_source)
            .field("offline", &self.offline)
            .field("progress", &self.progress)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

impl HubConfig {
    /// From the environment, as `huggingface_hub` reads it: `HF_ENDPOINT`, `HF_TOKEN` (then
    /// `HUGGING_FACE_HUB_TOKEN`, then `$HF_HOME/token`), `HF_HOME`, `HF_HUB_OFFLINE`; plus
    /// `TURBINE_DOWNLOAD_RETRIES` (default 4).
    pub fn from_env() -> Self {
        let hf_home = env_nonempty("HF_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let cache = env_nonempty("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| env_nonempty("HOME").map(|h| PathBuf::from(h).join(".cache")))
                    .unwrap_or_else(|| PathBuf::from(".cache"));
                cache.join("huggingface")
            });
        let (token, token_source) =
            match env_nonempty("HF_TOKEN").or_else(|| env_nonempty("HUGGING_FACE_HUB_TOKEN")) {
                Some(t) => (Some(t), TokenSource::Env),
                // hf-hub's Cache knows the token file's place relative to its `hub` folder.
                None => match Cache::new(hf_home.join("hub")).token() {
                    Some(t) => (Some(t), TokenSource::File),
                    None => (None, TokenSource::None),
                },
            };
        let endpoint = env_nonempty("HF_ENDPOINT")
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim_end_matches('/')
            .to_string();
        let offline = env_nonempty("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
        });
        Self {
            endpoint,
            token,
            token_source,
            offline,
            progress: std::io::stderr().is_terminal(),
            retries: env_nonempty("TURBINE_DOWNLOAD_RETRIES")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(4),
            retry_delay: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(20),
            read_timeout: Duration::from_secs(60),
            hf_home,
        }
    }

    /// A configuration for `endpoint` with no token, no progress bars and no environment.
    pub fn for_endpoint(endpoint: &str) -> Self {
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: None,
            token_source: TokenSource::None,
            offline: false,
            progress: false,
            retries: 4,
            retry_delay: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(20),
            read_timeout: Duration::from_secs(60),
            hf_home: PathBuf::from(".cache/huggingface"),
        }
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// What a `turbine download` did.
#[derive(Debug, Clone, Default)]
pub struct DownloadReport {
    pub dir: PathBuf,
    /// Files in the plan (all present and verified when the download returns Ok).
    pub files: usize,
    /// Files transferred in this run (relative to the model directory).
    pub fetched: Vec<String>,
    pub fetched_bytes: u64,
    /// Files that were already present and matched the Hub's hash.
    pub already_present: usize,
    pub total_bytes: u64,
    /// (repository, commit) of each source.
    pub commits: Vec<(String, String)>,
}

/// What a model directory holds compared with its plan and lock, judged without the network.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalStatus {
    /// Files of the plan not on disk.
    pub missing: Vec<String>,
    /// On disk, but not recorded as verified in the lock, or with another size than recorded.
    pub unverified: Vec<String>,
    /// On disk with the recorded size, but another SHA-256 (only when re-hashed).
    pub corrupt: Vec<String>,
    /// Sources whose lock records another repository or revision than the plan asks for.
    pub other_revision: Vec<String>,
    /// (repository, commit) of each source the lock records.
    pub commits: Vec<(String, String)>,
    /// Files of the plan, and the bytes of those that checked out.
    pub files: usize,
    pub verified_bytes: u64,
}

impl LocalStatus {
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty()
            && self.unverified.is_empty()
            && self.corrupt.is_empty()
            && self.other_revision.is_empty()
    }

    /// One phrase per kind of problem, naming the files.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut list = |what: &str, files: &[String]| {
            if !files.is_empty() {
                out.push(format!("{} {what}: {}", files.len(), files.join(", ")));
            }
        };
        list("missing file(s)", &self.missing);
        list(
            "file(s) not verified (absent from turbine-lock.json, or another size than it records)",
            &self.unverified,
        );
        list(
            "file(s) whose SHA-256 differs from turbine-lock.json (corrupt or replaced)",
            &self.corrupt,
        );
        out.extend(self.other_revision.iter().cloned());
        out
    }
}

/// The plan's files as they are on disk, checked against the lock by size only: cheap enough
/// for every start of the server (hashing 7 GB is not; `turbine download` hashes).
pub fn local_status(plan: &Plan) -> LocalStatus {
    // Without re-hashing no file is read, so there is no error to report.
    inspect(plan, None).unwrap_or_default()
}

/// Re-hashes every file of the plan against the lock, without any network access.
pub fn verify_offline(plan: &Plan, progress: bool) -> Result<LocalStatus, HubError> {
    let status = inspect(plan, Some(&Progress::new(progress)))?;
    if !status.is_complete() {
        return Err(HubError::Offline {
            model: plan.name.clone(),
            dir: plan.dir.clone(),
            problems: status.problems(),
            command: plan.command.clone(),
        });
    }
    Ok(status)
}

/// Compares the directory with the plan and the lock; with `rehash`, also each file's SHA-256.
/// Sources without a file list (`--repo`) take theirs from the lock.
fn inspect(plan: &Plan, rehash: Option<&Progress>) -> Result<LocalStatus, HubError> {
    let lock = Lock::read(&plan.dir);
    let mut st = LocalStatus::default();
    for source in &plan.sources {
        let locked = lock.as_ref().and_then(|l| l.repo(source.extra.as_deref()));
        if let Some(rec) = locked {
            if rec.repo == source.repo && revision_matches(rec, &source.revision) {
                st.commits.push((rec.repo.clone(), rec.commit.clone()));
            } else {
                st.other_revision.push(format!(
                    "the directory holds {} at revision `{}` (commit {}), not {} at `{}`",
                    rec.repo, rec.revision, rec.commit, source.repo, source.revision
                ));
            }
        }
        let files: Vec<String> = match (&source.files, locked) {
            (Some(f), _) => f.iter().map(|f| source.local_name(f)).collect(),
            (None, Some(rec)) => rec.files.keys().cloned().collect(),
            (None, None) => {
                st.missing.push(format!(
                    "(every file of {}: no turbine-lock.json lists them)",
                    source.repo
                ));
                continue;
            }
        };
        for local in files {
            st.files += 1;
            let path = plan.dir.join(&local);
            let len = match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => m.len(),
                _ => {
                    st.missing.push(local);
                    continue;
                }
            };
            let Some(rec) = locked
                .and_then(|r| r.files.get(&local))
                .filter(|f| f.size == len)
            else {
                st.unverified.push(local);
                continue;
            };
            if let Some(ui) = rehash {
                let bar = ui.bar("verifying", &local, Some(len));
                let got = hash_file(&path, None, &bar).map_err(|e| HubError::io(&path, e))?;
                bar.finish();
                if got.sha256 != rec.sha256 {
                    st.corrupt.push(local);
                    continue;
                }
            }
            st.verified_bytes += len;
        }
    }
    Ok(st)
}

fn revision_matches(rec: &LockedRepo, wanted: &str) -> bool {
    rec.revision == wanted || (wanted.len() >= 7 && rec.commit.starts_with(wanted))
}

/// Runs [`download`] to completion from synchronous code, inside or outside a tokio runtime
/// (on its own thread and runtime, so it never blocks a caller's async workers).
pub fn download_blocking(plan: &Plan, cfg: &HubConfig) -> Result<DownloadReport, HubError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| HubError::io("tokio runtime", e))?;
            rt.block_on(download(plan, cfg))
        })
        .join()
        .unwrap_or_else(|_| {
            Err(HubError::Usage(
                "the download thread panicked (this is a bug)".into(),
            ))
        })
    })
}

/// Fetches every file of `plan` that is not already present with the Hub's hash, resuming
/// partial files, and records each in the lock as it is verified. Uses the network: callers
/// check `--offline` / `HF_HUB_OFFLINE` first.
pub async fn download(plan: &Plan, cfg: &HubConfig) -> Result<DownloadReport, HubError> {
    std::fs::create_dir_all(&plan.dir).map_err(|e| HubError::io(&plan.dir, e))?;
    let hub = Hub::new(cfg)?;
    let ui = Progress::new(cfg.progress);
    let _exclusive = lock_dir(&plan.dir, &ui)?;
    let mut lock = Lock::read(&plan.dir).unwrap_or_else(|| Lock::new(&plan.name, &cfg.endpoint));
    lock.model = plan.name.clone();
    lock.endpoint = cfg.endpoint.clone();
    let mut report = DownloadReport {
        dir: plan.dir.clone(),
        ..Default::default()
    };

    // 1. Resolve each revision to a commit and ask for each file's size and hash, so that a
    //    wrong file name or a full disk shows before gigabytes are transferred.
    let mut tasks = Vec::new();
    for source in &plan.sources {
        let (commit, listing) = hub.repo_info(source).await?;
        let files = match &source.files {
            Some(files) => {
                let absent: Vec<&String> = files
                    .iter()
                    .filter(|f| !listing.is_empty() && !listing.contains(f))
                    .collect();
                if !absent.is_empty() {
                    return Err(HubError::NotFound {
                        what: format!(
                            "{} (in {} at revision `{}`, commit {commit})",
                            absent
                                .iter()
                                .map(|s| s.as_str())
                                .collect::<Vec<_>>()
                                .join(", "),
                            source.repo,
                            source.revision
                        ),
                        endpoint: cfg.endpoint.clone(),
                        status: 404,
                        hub_message: None,
                        advice: "The manifest names files the repository does not have at \
                                 this revision: check --revision, or the manifest's file list."
                            .into(),
                    });
                }
                files.clone()
            }
            None => {
                for f in &listing {
                    check_relative_path(f).map_err(|problem| HubError::BadResponse {
                        endpoint: cfg.endpoint.clone(),
                        url: format!("{}/api/models/{}", cfg.endpoint, source.repo),
                        problem,
                    })?;
                }
                let chosen = select_diffusers_files(&listing);
                if chosen.is_empty() {
                    return Err(HubError::NotFound {
                        what: format!("a diffusers model in {}", source.repo),
                        endpoint: cfg.endpoint.clone(),
                        status: 404,
                        hub_message: None,
                        advice: "The repository has no model_index.json / config.json with \
                                 safetensors weights."
                            .into(),
                    });
                }
                chosen
            }
        };
        let previous = lock.repo(source.extra.as_deref()).cloned();
        *lock.repo_mut(source.extra.as_deref()) = LockedRepo {
            repo: source.repo.clone(),
            revision: source.revision.clone(),
            commit: commit.clone(),
            files: Default::default(),
        };
        report.commits.push((source.repo.clone(), commit.clone()));
        let api_repo = hub.api_repo(&source.repo, &commit);
        for file in files {
            let local = source.local_name(&file);
            let remote = hub.file_meta(&api_repo, source, &file).await?;
            tasks.push(Task {
                source: source.clone(),
                extra: source.extra.clone(),
                path: plan.dir.join(&local),
                previous: previous
                    .as_ref()
                    .filter(|p| p.repo == source.repo)
                    .and_then(|p| p.files.get(&local).cloned()),
                local,
                remote,
            });
        }
    }
    report.files = tasks.len();

    // 2. Keep the files already present whose hash matches; delete the others.
    let mut to_fetch = Vec::new();
    for task in tasks {
        if task.path.is_file() {
            if let Some(rec) = verify_existing(&task, &ui)? {
                report.already_present += 1;
                report.total_bytes += rec.size;
                lock.repo_mut(task.extra.as_deref())
                    .files
                    .insert(task.local.clone(), rec);
                lock.write(&plan.dir)?;
                continue;
            }
            ui.note(&format!(
                "{} does not match {} at this commit: fetching it again",
                task.local, cfg.endpoint
            ));
            std::fs::remove_file(&task.path).map_err(|e| HubError::io(&task.path, e))?;
        }
        to_fetch.push(task);
    }

    // 3. Room for what is left to transfer.
    let needed: u64 = to_fetch
        .iter()
        .map(|t| {
            let have = std::fs::metadata(incomplete_path(&t.path))
                .map(|m| m.len())
                .unwrap_or(0);
            t.remote.size.unwrap_or(0).saturating_sub(have)
        })
        .sum();
    if let Ok(available) = fs2::available_space(&plan.dir) {
        if needed > available {
            return Err(HubError::DiskFull {
                dir: plan.dir.clone(),
                needed: Some(needed),
                available: Some(available),
            });
        }
    }

    // 4. Transfer.
    for task in to_fetch {
        let rec = hub.fetch(&task, &ui).await?;
        report.fetched_bytes += rec.size;
        report.total_bytes += rec.size;
        report.fetched.push(task.local.clone());
        lock.repo_mut(task.extra.as_deref())
            .files
            .insert(task.local.clone(), rec);
        lock.write(&plan.dir)?;
    }
    Ok(report)
}

/// Name of the advisory lock file that keeps two downloads out of one directory.
pub const DOWNLOAD_LOCK_FILE: &str = ".turbine-download.lock";

/// Holds an exclusive advisory lock on the model directory until dropped: two processes
/// appending to the same `.incomplete` file would corrupt it (two servers starting at once
/// on a fresh machine). The second waits, then finds the files present and verifies them.
fn lock_dir(dir: &Path, ui: &Progress) -> Result<std::fs::File, HubError> {
    use fs2::FileExt;
    let path = dir.join(DOWNLOAD_LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| HubError::io(&path, e))?;
    if file.try_lock_exclusive().is_err() {
        ui.note(&format!(
            "another turbine download is writing to {}; waiting for it to finish",
            dir.display()
        ));
        file.lock_exclusive().map_err(|e| HubError::io(&path, e))?;
    }
    Ok(file)
}

/// `<file>.incomplete`: the bytes received so far, never read by the loader.
pub fn incomplete_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".incomplete");
    PathBuf::from(s)
}

/// What the Hub says a file should be.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    Sha256(String),
    /// The git blob SHA-1 (`sha1("blob {len}\0" + bytes)`), the ETag of non-LFS files.
    GitSha1(String),
    Unknown,
}

#[derive(Debug, Clone)]
struct Remote {
    /// The resolve URL, at the commit.
    url: String,
    etag: Option<String>,
    size: Option<u64>,
    expect: Expect,
}

struct Task {
    /// The repository the file comes from (for error messages).
    source: Source,
    extra: Option<String>,
    local: String,
    path: PathBuf,
    remote: Remote,
    /// The lock's record of this file from an earlier run, if any.
    previous: Option<LockedFile>,
}

/// Why one attempt at a file failed.
enum Attempt {
    Failed(HubError),
    /// The resumed bytes could not be trusted (hash mismatch, odd range answer): start over.
    Restart(HubError),
}

struct Hub<'a> {
    cfg: &'a HubConfig,
    api: Api,
    /// Redirects are followed by hand, to read headers of the Hub's own answer and to keep
    /// the token off other origins.
    client: reqwest::Client,
    endpoint: Url,
}

impl<'a> Hub<'a> {
    fn new(cfg: &'a HubConfig) -> Result<Self, HubError> {
        let endpoint = Url::parse(&cfg.endpoint).map_err(|e| {
            HubError::Usage(format!(
                "HF_ENDPOINT `{}` is not a URL ({e}); expected e.g. https://hf-mirror.com",
                cfg.endpoint
            ))
        })?;
        let api = ApiBuilder::from_cache(Cache::new(cfg.hf_home.join("hub")))
            .with_endpoint(cfg.endpoint.clone())
            .with_token(cfg.token.clone())
            .with_progress(false)
            .with_user_agent("turbine", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|e| {
                HubError::Usage(format!(
                    "cannot set up the Hub client: {e} (is {} a single line?)",
                    match cfg.token_source {
                        TokenSource::File => "$HF_HOME/token",
                        _ => "HF_TOKEN",
                    }
                ))
            })?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(cfg.connect_timeout)
            .read_timeout(cfg.read_timeout)
            .user_agent(concat!(
                "turbine/",
                env!("CARGO_PKG_VERSION"),
                "; hf-hub/0.4"
            ))
            .build()
            .map_err(|e| HubError::Usage(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Self {
            cfg,
            api,
            client,
            endpoint,
        })
    }

    fn api_repo(&self, repo: &str, revision: &str) -> ApiRepo {
        self.api.repo(Repo::with_revision(
            repo.to_string(),
            RepoType::Model,
            revision.to_string(),
        ))
    }

    /// The commit a source's revision points at, and the repository's file list.
    async fn repo_info(&self, source: &Source) -> Result<(String, Vec<String>), HubError> {
        let what = format!("the file list of {} at `{}`", source.repo, source.revision);
        let request = self.api_repo(&source.repo, &source.revision).info_request();
        // hf-hub's client has no timeouts of its own.
        let limit = self.cfg.connect_timeout + self.cfg.read_timeout;
        let response = match tokio::time::timeout(limit, request.send()).await {
            Err(_) => {
                return Err(HubError::Unreachable {
                    endpoint: self.cfg.endpoint.clone(),
                    what,
                    detail: format!("no answer within {} s", limit.as_secs()),
                })
            }
            Ok(r) => r.map_err(|e| self.transport_error(&e, &what))?,
        };
        let url = response.url().to_string();
        if !response.status().is_success() {
            return Err(self.status_error(&response, source, None));
        }
        let info: hf_hub::api::RepoInfo =
            response.json().await.map_err(|e| HubError::BadResponse {
                endpoint: self.cfg.endpoint.clone(),
                url: url.clone(),
                problem: format!("the repository info is not the Hub's JSON ({e})"),
            })?;
        if info.sha.is_empty() || !info.sha.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(HubError::BadResponse {
                endpoint: self.cfg.endpoint.clone(),
                url,
                problem: format!("`{}` is not a commit hash", info.sha),
            });
        }
        let listing = info.siblings.into_iter().map(|s| s.rfilename).collect();
        Ok((info.sha, listing))
    }

    /// Size, ETag and expected hash of one file, from a HEAD on its resolve URL.
    async fn file_meta(
        &self,
        api_repo: &ApiRepo,
        source: &Source,
        file: &str,
    ) -> Result<Remote, HubError> {
        let resolve = api_repo.url(file);
        let mut url = self.parse_url(&resolve)?;
        for _ in 0..10 {
            let response = self.send(Method::HEAD, &url, 0, file).await?;
            let status = response.status();
            if status.is_redirection() {
                let next = self.location(&response, &url)?;
                // Relative redirects (a renamed repository) are the Hub's own; an LFS file's
                // redirect to the CDN carries the file's metadata in this answer's headers.
                if same_origin(&next, &url) {
                    url = next;
                    continue;
                }
                return Ok(remote_from_headers(resolve, response.headers(), true));
            }
            if !status.is_success() {
                return Err(self.status_error(&response, source, Some(file)));
            }
            return Ok(remote_from_headers(resolve, response.headers(), false));
        }
        Err(self.too_many_redirects(&resolve))
    }

    /// A GET that follows redirects, resuming at byte `from`.
    async fn get(&self, url: &str, from: u64, file: &str) -> Result<reqwest::Response, HubError> {
        let mut url = self.parse_url(url)?;
        for _ in 0..10 {
            let response = self.send(Method::GET, &url, from, file).await?;
            if response.status().is_redirection() {
                url = self.location(&response, &url)?;
                continue;
            }
            return Ok(response);
        }
        Err(self.too_many_redirects(url.as_str()))
    }

    async fn send(
        &self,
        method: Method,
        url: &Url,
        from: u64,
        file: &str,
    ) -> Result<reqwest::Response, HubError> {
        let mut request = self
            .client
            .request(method, url.clone())
            // The size the Hub reports is of the raw bytes: no transfer compression.
            .header(ACCEPT_ENCODING, "identity");
        if from > 0 {
            request = request.header(RANGE, format!("bytes={from}-"));
        }
        if let Some(token) = &self.cfg.token {
            if same_origin(url, &self.endpoint) {
                request = request.bearer_auth(token);
            }
        }
        request
            .send()
            .await
            .map_err(|e| self.transport_error(&e, file))
    }

    fn parse_url(&self, url: &str) -> Result<Url, HubError> {
        Url::parse(url).map_err(|e| HubError::BadResponse {
            endpoint: self.cfg.endpoint.clone(),
            url: url.to_string(),
            problem: format!("not a valid URL ({e})"),
        })
    }

    fn location(&self, response: &reqwest::Response, base: &Url) -> Result<Url, HubError> {
        response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|l| base.join(l).ok())
            .ok_or_else(|| HubError::BadResponse {
                endpoint: self.cfg.endpoint.clone(),
                url: base.to_string(),
                problem: format!(
                    "a redirect ({}) without a usable Location header",
                    response.status()
                ),
            })
    }

    fn too_many_redirects(&self, url: &str) -> HubError {
        HubError::BadResponse {
            endpoint: self.cfg.endpoint.clone(),
            url: url.to_string(),
            problem: "more than 10 redirects".into(),
        }
    }

    fn transport_error(&self, e: &reqwest::Error, what: &str) -> HubError {
        let detail = error_chain(e);
        // rustls' refusal of the certificate, as the I/O error that carries it says.
        if detail.contains("invalid peer certificate") {
            return HubError::Untrusted {
                host: e
                    .url()
                    .and_then(|u| u.host_str())
                    .map_or_else(|| self.cfg.endpoint.clone(), str::to_string),
                what: what.to_string(),
                detail,
            };
        }
        HubError::Unreachable {
            endpoint: self.cfg.endpoint.clone(),
            what: what.to_string(),
            detail,
        }
    }

    /// Maps a non-success answer to the error the user can act on, using the Hub's
    /// `X-Error-Code` / `X-Error-Message` headers where present.
    fn status_error(
        &self,
        response: &reqwest::Response,
        source: &Source,
        file: Option<&str>,
    ) -> HubError {
        let status = response.status();
        let header = |n: &str| {
            response
                .headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let code = header("x-error-code").unwrap_or_default();
        let hub_message = header("x-error-message");
        let endpoint = self.cfg.endpoint.clone();
        let repo = source.repo.clone();
        match status {
            // The Hub answers 401 both for gated/private repositories without a token and for
            // repositories that do not exist; with a token, a missing one is a 404.
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => HubError::Auth {
                repo,
                endpoint,
                status: status.as_u16(),
                token: self.cfg.token_source,
                hub_message,
            },
            StatusCode::NOT_FOUND => {
                let (what, advice) = match (code.as_str(), file) {
                    ("RevisionNotFound", _) => (
                        format!("revision `{}` of {repo}", source.revision),
                        "Check --revision: a branch, a tag or a full commit hash.".to_string(),
                    ),
                    ("EntryNotFound", Some(f)) | ("", Some(f)) => (
                        format!("file `{f}` of {repo} at revision `{}`", source.revision),
                        "The repository has no such file at this revision: check the \
                         manifest's file list or --revision."
                            .to_string(),
                    ),
                    _ => (
                        format!("repository {repo}"),
                        "Check the repository id (--repo, or the manifest's `repo`). Private \
                         repositories also answer 404 to accounts without access."
                            .to_string(),
                    ),
                };
                HubError::NotFound {
                    what,
                    endpoint,
                    status: 404,
                    hub_message,
                    advice,
                }
            }
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => HubError::Server {
                endpoint,
                url: response.url().to_string(),
                status: s.as_u16(),
                hub_message,
            },
            s => HubError::BadResponse {
                endpoint,
                url: response.url().to_string(),
                problem: format!(
                    "HTTP {s}{}",
                    hub_message.map(|m| format!(" ({m})")).unwrap_or_default()
                ),
            },
        }
    }

    /// Downloads one file, resuming its `.incomplete` and retrying transient failures.
    async fn fetch(&self, task: &Task, ui: &Progress) -> Result<LockedFile, HubError> {
        let partial = incomplete_path(&task.path);
        let mut restarted = false;
        let mut failures = 0u32;
        loop {
            match self.fetch_once(task, &partial, ui).await {
                Ok(rec) => return Ok(rec),
                Err(Attempt::Restart(e)) => {
                    remove_if_exists(&partial)?;
                    if restarted {
                        return Err(e);
                    }
                    ui.note(&format!(
                        "{}: the resumed bytes do not check out ({e}); starting it over",
                        task.local
                    ));
                    restarted = true;
                }
                Err(Attempt::Failed(e)) if e.is_transient() && failures < self.cfg.retries => {
                    let wait = self
                        .cfg
                        .retry_delay
                        .saturating_mul(1 << failures.min(8))
                        .min(Duration::from_secs(30));
                    failures += 1;
                    ui.note(&format!(
                        "{}: {e}\nretrying in {} s (attempt {} of {})",
                        task.local,
                        wait.as_secs(),
                        failures + 1,
                        self.cfg.retries + 1
                    ));
                    tokio::time::sleep(wait).await;
                }
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
    }

    async fn fetch_once(
        &self,
        task: &Task,
        partial: &Path,
        ui: &Progress,
    ) -> Result<LockedFile, Attempt> {
        let failed = |e| Attempt::Failed(e);
        if let Some(parent) = partial.parent() {
            std::fs::create_dir_all(parent).map_err(|e| failed(HubError::io(parent, e)))?;
        }
        let mut have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
        if task.remote.size.is_some_and(|size| have > size) {
            remove_if_exists(partial).map_err(failed)?;
            have = 0;
        }
        let resumed = have > 0;
        let bar = ui.bar("fetching", &task.local, task.remote.size);
        let mut hashes = Hashes::new(&task.remote);
        if resumed {
            hashes =
                hash_prefix(partial, hashes, &bar).map_err(|e| failed(HubError::io(partial, e)))?;
        }
        let mut written = have;
        if task.remote.size != Some(have) || !resumed {
            let mut response = self
                .get(&task.remote.url, have, &task.local)
                .await
                .map_err(failed)?;
            let status = response.status();
            match status {
                StatusCode::PARTIAL_CONTENT => {
                    let starts_at = content_range_start(response.headers());
                    if starts_at != Some(have) {
                        return Err(Attempt::Restart(HubError::BadResponse {
                            endpoint: self.cfg.endpoint.clone(),
                            url: response.url().to_string(),
                            problem: format!(
                                "asked for bytes from {have}, got a range starting at {starts_at:?}"
                            ),
                        }));
                    }
                }
                StatusCode::OK if have > 0 => {
                    // The server ignored the Range header: take the whole file again.
                    remove_if_exists(partial).map_err(failed)?;
                    have = 0;
                    written = 0;
                    hashes = Hashes::new(&task.remote);
                    bar.set_position(0);
                }
                StatusCode::OK => {}
                StatusCode::RANGE_NOT_SATISFIABLE => {
                    return Err(Attempt::Restart(HubError::BadResponse {
                        endpoint: self.cfg.endpoint.clone(),
                        url: response.url().to_string(),
                        problem: format!("the server cannot resume at byte {have}"),
                    }));
                }
                _ => {
                    return Err(failed(self.status_error(
                        &response,
                        &task.source,
                        Some(&task.local),
                    )))
                }
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(partial)
                .map_err(|e| failed(HubError::io(partial, e)))?;
            // Large writes: one syscall per 4 MiB instead of per network chunk.
            let mut out = std::io::BufWriter::with_capacity(4 << 20, file);
            let since = (Instant::now(), written);
            loop {
                match response.chunk().await {
                    Ok(Some(bytes)) => {
                        out.write_all(&bytes)
                            .map_err(|e| failed(HubError::io(partial, e)))?;
                        hashes.update(&bytes);
                        written += bytes.len() as u64;
                        bar.set_position(written);
                        ui.advanced(&task.local, written, task.remote.size, since);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        out.flush().map_err(|e| failed(HubError::io(partial, e)))?;
                        bar.abandon();
                        return Err(failed(HubError::Interrupted {
                            file: task.local.clone(),
                            partial: partial.to_path_buf(),
                            got: written,
                            total: task.remote.size,
                            detail: error_chain(&e),
                        }));
                    }
                }
            }
            let file = out
                .into_inner()
                .map_err(|e| failed(HubError::io(partial, e.into_error())))?;
            file.sync_all()
                .map_err(|e| failed(HubError::io(partial, e)))?;
        }
        if let Some(size) = task.remote.size {
            if written < size {
                bar.abandon();
                return Err(failed(HubError::Interrupted {
                    file: task.local.clone(),
                    partial: partial.to_path_buf(),
                    got: written,
                    total: Some(size),
                    detail: "the server closed the response early".into(),
                }));
            }
            if written > size {
                remove_if_exists(partial).map_err(failed)?;
                bar.abandon();
                return Err(Attempt::Restart(HubError::BadResponse {
                    endpoint: self.cfg.endpoint.clone(),
                    url: task.remote.url.clone(),
                    problem: format!("{} is {written} bytes, {size} were announced", task.local),
                }));
            }
        }
        let got = hashes.finish();
        if let Some((algo, expected, actual)) = got.mismatch(&task.remote.expect) {
            remove_if_exists(partial).map_err(failed)?;
            bar.abandon();
            let e = HubError::Checksum {
                file: task.local.clone(),
                algo,
                expected,
                actual,
            };
            return Err(if resumed {
                Attempt::Restart(e)
            } else {
                Attempt::Failed(e)
            });
        }
        std::fs::rename(partial, &task.path).map_err(|e| failed(HubError::io(&task.path, e)))?;
        bar.finish();
        ui.done(&task.local, written - have, bar.elapsed());
        Ok(LockedFile {
            size: written,
            sha256: got.sha256,
            etag: task.remote.etag.clone(),
        })
    }
}

fn remove_if_exists(path: &Path) -> Result<(), HubError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HubError::io(path, e)),
    }
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

fn content_range_start(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get(CONTENT_RANGE)?.to_str().ok()?;
    let range = v.strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

/// `W/"abc"` and `"abc"` to `abc`.
fn normalize_etag(v: &str) -> String {
    v.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.chars().all(|c| c.is_ascii_hexdigit())
}

fn remote_from_headers(url: String, headers: &HeaderMap, redirected: bool) -> Remote {
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let linked = get("x-linked-etag").map(normalize_etag);
    let etag = linked.clone().or_else(|| get("etag").map(normalize_etag));
    let size = get("x-linked-size")
        .or(if redirected {
            None
        } else {
            get("content-length")
        })
        .and_then(|s| s.trim().parse().ok());
    let expect = match (&linked, &etag) {
        (Some(l), _) if is_hex(l, 64) => Expect::Sha256(l.to_ascii_lowercase()),
        (None, Some(e)) if is_hex(e, 40) && size.is_some() => {
            Expect::GitSha1(e.to_ascii_lowercase())
        }
        (_, Some(e)) if is_hex(e, 64) => Expect::Sha256(e.to_ascii_lowercase()),
        _ => Expect::Unknown,
    };
    Remote {
        url,
        etag,
        size,
        expect,
    }
}

/// SHA-256 always (recorded in the lock), plus the git blob SHA-1 when that is what the Hub
/// advertises.
struct Hashes {
    sha256: sha2::Sha256,
    git_sha1: Option<sha1::Sha1>,
}

struct Digests {
    sha256: String,
    git_sha1: Option<String>,
}

impl Hashes {
    fn new(remote: &Remote) -> Self {
        let git_sha1 = match (&remote.expect, remote.size) {
            (Expect::GitSha1(_), Some(size)) => Some(git_blob_hasher(size)),
            _ => None,
        };
        Self {
            sha256: sha2::Sha256::new(),
            git_sha1,
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        self.sha256.update(bytes);
        if let Some(h) = &mut self.git_sha1 {
            h.update(bytes);
        }
    }

    fn finish(self) -> Digests {
        Digests {
            sha256: hex::encode(self.sha256.finalize()),
            git_sha1: self.git_sha1.map(|h| hex::encode(h.finalize())),
        }
    }
}

fn git_blob_hasher(size: u64) -> sha1::Sha1 {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {size}\0").as_bytes());
    h
}

impl Digests {
    /// (algorithm, expected, actual) when the bytes are not what the Hub advertised.
    fn mismatch(&self, expect: &Expect) -> Option<(&'static str, String, String)> {
        match expect {
            Expect::Sha256(want) if *want != self.sha256 => {
                Some(("SHA-256", want.clone(), self.sha256.clone()))
            }
            Expect::GitSha1(want) => match &self.git_sha1 {
                Some(got) if got != want => Some(("git blob SHA-1", want.clone(), got.clone())),
                _ => None,
            },
            _ => None,
        }
    }
}

fn hash_prefix(path: &Path, mut hashes: Hashes, bar: &ProgressBar) -> std::io::Result<Hashes> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hashes);
        }
        hashes.update(&buf[..n]);
        done += n as u64;
        bar.set_position(done);
    }
}

/// Hashes a whole file (SHA-256, plus the git blob SHA-1 when `git_size` is given).
fn hash_file(path: &Path, git_size: Option<u64>, bar: &ProgressBar) -> std::io::Result<Digests> {
    let hashes = Hashes {
        sha256: sha2::Sha256::new(),
        git_sha1: git_size.map(git_blob_hasher),
    };
    Ok(hash_prefix(path, hashes, bar)?.finish())
}

/// The record for a file already in place, or `None` when it must be fetched again.
fn verify_existing(task: &Task, ui: &Progress) -> Result<Option<LockedFile>, HubError> {
    let path = &task.path;
    let len = std::fs::metadata(path)
        .map_err(|e| HubError::io(path, e))?
        .len();
    if task.remote.size.is_some_and(|s| s != len) {
        return Ok(None);
    }
    let git_size = matches!(task.remote.expect, Expect::GitSha1(_)).then_some(len);
    let bar = ui.bar("verifying", &task.local, Some(len));
    let got = hash_file(path, git_size, &bar).map_err(|e| HubError::io(path, e))?;
    bar.finish_and_clear();
    let ok = match &task.remote.expect {
        Expect::Sha256(_) | Expect::GitSha1(_) => got.mismatch(&task.remote.expect).is_none(),
        // Nothing to check against but our own earlier record of the same Hub file.
        Expect::Unknown => task.previous.as_ref().is_some_and(|p| {
            p.etag.is_some()
                && p.etag == task.remote.etag
                && p.size == len
                && p.sha256 == got.sha256
        }),
    };
    Ok(ok.then(|| LockedFile {
        size: len,
        sha256: got.sha256,
        etag: task.remote.etag.clone(),
    }))
}

/// Progress bars on stderr when it is a terminal; log lines otherwise: one per file when it
/// is done, and one every [`PROGRESS_LOG_EVERY`] while a file is on its way (the UNet alone is
/// 5 GB: minutes without a word in a container's log read as a hang).
struct Progress {
    multi: MultiProgress,
    visible: bool,
    /// When the last progress line was logged (hidden bars only).
    logged: std::sync::Mutex<Option<Instant>>,
}

/// How often a download without a terminal says how far it is.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(30);

/// The progress line of `name`, `written` of `total` bytes, `since` (when this transfer began,
/// and the bytes it began with), at `now`; `None` when the last line is less than
/// [`PROGRESS_LOG_EVERY`] old (the first comes that long after the transfer began).
fn progress_line(
    name: &str,
    written: u64,
    total: Option<u64>,
    since: (Instant, u64),
    last: &mut Option<Instant>,
    now: Instant,
) -> Option<String> {
    let previous = last.unwrap_or(since.0).max(since.0);
    if now.duration_since(previous) < PROGRESS_LOG_EVERY {
        return None;
    }
    *last = Some(now);
    let secs = now.duration_since(since.0).as_secs_f64().max(1e-3);
    let rate = written.saturating_sub(since.1) as f64 / secs;
    let mut line = format!("fetching {name}: {}", human_bytes(written));
    if let Some(total) = total.filter(|&t| t > 0) {
        line += &format!(
            " of {} ({:.0}%)",
            human_bytes(total),
            100.0 * written as f64 / total as f64
        );
        if rate >= 1.0 {
            let left = total.saturating_sub(written) as f64 / rate;
            line += &format!(
                ", about {} left",
                indicatif::HumanDuration(Duration::from_secs_f64(left))
            );
        }
    }
    line += &format!(", {}/s", human_bytes(rate as u64));
    Some(line)
}

impl Progress {
    fn new(visible: bool) -> Self {
        let target = if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            multi: MultiProgress::with_draw_target(target),
            visible,
            logged: std::sync::Mutex::new(None),
        }
    }

    /// Says how far a file's transfer is, now and then, where there are no bars to show it.
    fn advanced(&self, name: &str, written: u64, total: Option<u64>, since: (Instant, u64)) {
        if self.visible {
            return;
        }
        let mut last = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(line) = progress_line(name, written, total, since, &mut last, Instant::now()) {
            tracing::info!("{line}");
        }
    }

    fn bar(&self, verb: &str, name: &str, total: Option<u64>) -> ProgressBar {
        let bar = match total {
            Some(t) => ProgressBar::new(t),
            None => ProgressBar::no_length(),
        };
        let style = ProgressStyle::with_template(
            "{prefix:>9} {msg:40!} {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} \
             [{bar:30.cyan/blue}] {eta:>4}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        self.multi.add(
            bar.with_style(style)
                .with_prefix(verb.to_string())
                .with_message(name.to_string()),
        )
    }

    fn note(&self, msg: &str) {
        if self.visible {
            let _ = self.multi.println(msg);
        } else {
            tracing::warn!("{msg}");
        }
    }

    fn done(&self, name: &str, bytes: u64, took: Duration) {
        if !self.visible {
            let secs = took.as_secs_f64().max(1e-3);
            tracing::info!(
                "fetched {name}: {} in {:.1} s ({}/s)",
                human_bytes(bytes),
                secs,
                human_bytes((bytes as f64 / secs) as u64)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_download_without_a_terminal_says_how_far_it_is_every_30_s() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut last = None;
        let name = "unet/diffusion_pytorch_model.fp16.safetensors";
        let total = Some(5_000_000_000);
        // Resumed at 1 GB: the rate counts this transfer's bytes only.
        let since = (t0, 1_000_000_000);
        assert_eq!(
            progress_line(name, 1_500_000_000, total, since, &mut last, at(29)),
            None
        );
        let line = progress_line(name, 1_600_000_000, total, since, &mut last, at(30)).unwrap();
        assert_eq!(
            line,
            "fetching unet/diffusion_pytorch_model.fp16.safetensors: 1.49 GiB of 4.66 GiB (32%), \
             about 3 minutes left, 19.07 MiB/s"
        );
        // Not again for another 30 s.
        assert_eq!(
            progress_line(name, 1_700_000_000, total, since, &mut last, at(59)),
            None
        );
        assert!(progress_line(name, 1_900_000_000, total, since, &mut last, at(60)).is_some());
        // A file of unknown size, and a stalled one, still get their line.
        let mut last = None;
        let line = progress_line("x", 10, None, (t0, 10), &mut last, at(31)).unwrap();
        assert_eq!(line, "fetching x: 10 B, 0 B/s");
    }

    #[test]
    fn git_blob_sha1_matches_git() {
        // `printf 'hello\n' | git hash-object --stdin`
        let bar = ProgressBar::hidden();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"hello\n").unwrap();
        let d = hash_file(&p, Some(6), &bar).unwrap();
        assert_eq!(
            d.git_sha1.as_deref(),
            Some("ce013625030ba8dba906f756967f9e9ca394464a")
        );
        assert_eq!(
            d.sha256,
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
    }

    #[test]
    fn lfs_headers_give_sha256_and_linked_size() {
        let mut h = HeaderMap::new();
        let sha = "a".repeat(64);
        h.insert("x-linked-etag", format!("\"{sha}\"").parse().unwrap());
        h.insert("etag", "W/\"xyz\"".parse().unwrap());
        h.insert("x-linked-size", "123".parse().unwrap());
        h.insert("content-length", "0".parse().unwrap());
        let r = remote_from_headers("u".into(), &h, true);
        assert_eq!(r.expect, Expect::Sha256(sha.clone()));
        assert_eq!(r.size, Some(123));
        assert_eq!(r.etag.as_deref(), Some(sha.as_str()));

        let mut h = HeaderMap::new();
        let sha1 = "b".repeat(40);
        h.insert("etag", format!("\"{sha1}\"").parse().unwrap());
        h.insert("content-length", "7".parse().unwrap());
        let r = remote_from_headers("u".into(), &h, false);
        assert_eq!(r.expect, Expect::GitSha1(sha1));
        assert_eq!(r.size, Some(7));
    }

    #[test]
    fn incomplete_path_appends_suffix() {
        assert_eq!(
            incomplete_path(Path::new("m/unet/w.fp16.safetensors")),
            PathBuf::from("m/unet/w.fp16.safetensors.incomplete")
        );
    }
}
