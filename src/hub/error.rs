//! What can go wrong when fetching or locating a model, each as one paragraph a user can act on.
//!
//! Every message names the repository / file / directory at fault and says what to do next;
//! none contains the token.

use std::path::PathBuf;

/// Where the token sent to the Hub came from (never the token itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    None,
    /// `HF_TOKEN` (or the older `HUGGING_FACE_HUB_TOKEN`).
    Env,
    /// The file `huggingface-cli login` writes: `$HF_HOME/token`.
    File,
}

impl TokenSource {
    fn describe(self) -> &'static str {
        match self {
            TokenSource::None => "no token",
            TokenSource::Env => "the token in HF_TOKEN",
            TokenSource::File => "the token in $HF_HOME/token (from `huggingface-cli login`)",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "{endpoint} refused access to {repo} (HTTP {status}{hub}). {advice}",
        hub = hub_says(hub_message),
        advice = auth_advice(*token, endpoint, repo)
    )]
    Auth {
        repo: String,
        endpoint: String,
        status: u16,
        token: TokenSource,
        hub_message: Option<String>,
    },

    #[error("{what} was not found at {endpoint} (HTTP {status}{hub}). {advice}",
        hub = hub_says(hub_message))]
    NotFound {
        what: String,
        endpoint: String,
        status: u16,
        hub_message: Option<String>,
        advice: String,
    },

    #[error(
        "cannot reach {endpoint} ({detail}) while fetching {what}. Check the network connection \
         and any proxy (HTTPS_PROXY). Where huggingface.co is slow or blocked, point HF_ENDPOINT at \
         a mirror, for example `HF_ENDPOINT=https://hf-mirror.com`; to run without any network, \
         copy a model directory from another machine and start with --offline or --model-dir DIR."
    )]
    Unreachable {
        endpoint: String,
        what: String,
        detail: String,
    },

    #[error(
        "{host} showed a certificate this machine does not trust ({detail}) while fetching \
         {what}. A mirror, or a proxy that inspects HTTPS, signed by a company CA needs that CA: \
         add it to the system's trust store (update-ca-certificates) or point SSL_CERT_FILE at \
         its PEM file (SSL_CERT_DIR at a directory of them)."
    )]
    Untrusted {
        host: String,
        what: String,
        detail: String,
    },

    #[error(
        "the download of {file} stopped after {got} of {total} bytes ({detail}). The bytes so far \
         are kept in {partial}; run the same command again to resume from there. If this keeps \
         happening, the connection or the mirror is unstable: try another HF_ENDPOINT.",
        total = total.map(|t| t.to_string()).unwrap_or_else(|| "?".into()),
        partial = partial.display()
    )]
    Interrupted {
        file: String,
        partial: PathBuf,
        got: u64,
        total: Option<u64>,
        detail: String,
    },

    #[error(
        "{endpoint} answered HTTP {status} for {url}{hub}. The server is overloaded or failing: \
         run the command again later (finished files are kept and a partial one resumes), or use \
         another HF_ENDPOINT.",
        hub = hub_says(hub_message)
    )]
    Server {
        endpoint: String,
        url: String,
        status: u16,
        hub_message: Option<String>,
    },

    #[error(
        "{url} gave an answer turbine cannot use: {problem}. The endpoint ({endpoint}) does not \
         behave like the Hugging Face Hub; check HF_ENDPOINT (it should be the mirror's base URL, \
         such as https://hf-mirror.com, without a path)."
    )]
    BadResponse {
        endpoint: String,
        url: String,
        problem: String,
    },

    #[error(
        "not enough disk space in {dir} ({space}). Free some space or download to a larger \
         disk with --dir DIR (then start with --model-dir DIR). Finished files are kept, and a \
         partial file resumes on the next run.",
        dir = dir.display(),
        space = space_note(*needed, *available)
    )]
    DiskFull {
        dir: PathBuf,
        needed: Option<u64>,
        available: Option<u64>,
    },

    #[error(
        "checksum mismatch for {file}: the Hub advertises {algo} {expected}, but the downloaded \
         bytes hash to {actual}. The bad file was deleted, nothing was left in its place. A broken \
         mirror or proxy cache usually causes this: run again, or try another HF_ENDPOINT."
    )]
    Checksum {
        file: String,
        algo: &'static str,
        expected: String,
        actual: String,
    },

    #[error(
        "--offline: {dir} is not a complete, verified copy of {model}: {problems}. Fetch it with \
         `{command}` on a machine with network access (the Hub or a mirror set in HF_ENDPOINT), or \
         copy the files over; to load a directory without checking it, use --model-dir DIR.",
        dir = dir.display(),
        problems = problems.join("; ")
    )]
    Offline {
        model: String,
        dir: PathBuf,
        problems: Vec<String>,
        command: String,
    },

    #[error(
        "cannot write to {path} ({cause}). The weights go under --models-root \
         (TURBINE_MODELS_ROOT), or where `turbine download --dir` says; a relative path is taken \
         from the working directory. Point it at a directory this user can write to (in a \
         container, a mounted volume), or copy the weights there from elsewhere and start with \
         --model-dir DIR.",
        path = path.display()
    )]
    NotWritable {
        path: PathBuf,
        /// Not a `source`: the message says it, once.
        cause: std::io::Error,
    },

    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{0}")]
    Usage(String),
}

impl HubError {
    /// The process exit code for this error, so scripts can tell the causes apart (README).
    pub fn exit_code(&self) -> u8 {
        match self {
            HubError::Usage(_) => 2,
            HubError::Unreachable { .. }
            | HubError::Untrusted { .. }
            | HubError::Interrupted { .. }
            | HubError::Server { .. }
            | HubError::BadResponse { .. } => 3,
            HubError::Auth { .. } => 4,
            HubError::NotFound { .. } => 5,
            HubError::DiskFull { .. } => 6,
            HubError::Checksum { .. } => 7,
            HubError::Offline { .. } => 8,
            HubError::Io { .. } | HubError::NotWritable { .. } => 1,
        }
    }

    /// Wraps an I/O error on `path`, turning "no space left" into [`HubError::DiskFull`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if is_disk_full(&source) {
            let dir = path.parent().map(PathBuf::from).unwrap_or_default();
            let available = fs2::available_space(&dir).ok();
            return HubError::DiskFull {
                dir,
                needed: None,
                available,
            };
        }
        if matches!(
            source.kind(),
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
        ) {
            // Said in full: a relative path means little in a container's log.
            let path = std::path::absolute(&path).unwrap_or(path);
            return HubError::NotWritable {
                path,
                cause: source,
            };
        }
        HubError::Io { path, source }
    }

    /// Errors worth another attempt in the same run (the connection, not the request, failed).
    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self,
            HubError::Unreachable { .. } | HubError::Interrupted { .. } | HubError::Server { .. }
        )
    }
}

pub(crate) fn is_disk_full(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge
    )
}

fn space_note(needed: Option<u64>, available: Option<u64>) -> String {
    match (needed, available) {
        (Some(n), Some(a)) => format!("{} more needed, {} free", human_bytes(n), human_bytes(a)),
        (Some(n), None) => format!("{} more needed", human_bytes(n)),
        (None, Some(a)) => format!("the disk filled up while writing; {} free", human_bytes(a)),
        (None, None) => "the disk filled up while writing".into(),
    }
}

fn hub_says(message: &Option<String>) -> String {
    match message {
        Some(m) if !m.trim().is_empty() => format!(": \"{}\"", m.trim()),
        _ => String::new(),
    }
}

fn auth_advice(token: TokenSource, endpoint: &str, repo: &str) -> String {
    match token {
        TokenSource::None => format!(
            "No token was sent, and this repository is gated or private (or does not exist). \
             Accept its terms while logged in at {endpoint}/{repo}, create a read token at \
             https://huggingface.co/settings/tokens and set HF_TOKEN=hf_... (or run \
             `huggingface-cli login`, which stores it in $HF_HOME/token)."
        ),
        t => format!(
            "{} was rejected or does not give access to this repository: check that the token \
             is valid, and that its account has been granted access at {endpoint}/{repo}.",
            capitalize(t.describe())
        ),
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// Bytes in binary units with one decimal ("6.5 GiB"), for messages.
pub fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

/// The error and its causes on one line: reqwest hides the useful part (DNS, refused) in sources.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A models root this user cannot write to (a container's working directory `/`, a
    /// read-only root filesystem) is said once, with the whole path and what to set. It read
    /// `models/sdxl-turbo: Permission denied (os error 13): Permission denied (os error 13)`.
    #[test]
    fn an_unwritable_models_root_says_where_and_what_to_set() {
        for kind in [
            std::io::ErrorKind::PermissionDenied,
            std::io::ErrorKind::ReadOnlyFilesystem,
        ] {
            let e = HubError::io("models/sdxl-turbo", std::io::Error::from(kind));
            assert!(matches!(e, HubError::NotWritable { .. }), "{e}");
            assert_eq!(e.exit_code(), 1);
            let said = format!("{:#}", anyhow::Error::from(e));
            let whole = std::env::current_dir().unwrap().join("models/sdxl-turbo");
            assert!(
                said.starts_with(&format!("cannot write to {}", whole.display())),
                "{said}"
            );
            assert!(
                said.contains("--models-root") && said.contains("--model-dir"),
                "{said}"
            );
            let cause = std::io::Error::from(kind).to_string();
            assert_eq!(said.matches(&cause).count(), 1, "{said}");
        }
        // Other failures stay as they were.
        let e = HubError::io("x", std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(matches!(e, HubError::Io { .. }));
    }
}
