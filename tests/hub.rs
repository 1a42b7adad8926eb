//! `turbine download` and `ModelArgs::resolve` against a Hub look-alike on 127.0.0.1
//! (tests/support): downloads, resume, corruption, offline use, tokens and error messages.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{sha256_hex, FakeHub};
use turbine::hub::{self, HubConfig, HubError, Lock, Manifest, ModelArgs, Plan, TokenSource};

const TINY: &str = "test/tiny-sdxl";
const UNET: &str = "unet/diffusion_pytorch_model.safetensors";

fn config(hub: &FakeHub) -> HubConfig {
    let mut c = HubConfig::for_endpoint(&hub.endpoint);
    c.retries = 0;
    c.retry_delay = Duration::ZERO;
    c
}

fn repo_plan(dir: &Path) -> Plan {
    Plan::for_repo(TINY, "main", dir).unwrap()
}

/// Writes a manifest for the tiny model under `root/tiny/`, listing all its files.
fn tiny_manifest(root: &Path) -> Manifest {
    let files: Vec<String> = support::tiny_model().keys().cloned().collect();
    let m = Manifest {
        name: "tiny".into(),
        description: String::new(),
        repo: TINY.into(),
        revision: "main".into(),
        files,
        vae: Default::default(),
    };
    std::fs::create_dir_all(root.join("tiny")).unwrap();
    std::fs::write(
        root.join("tiny/manifest.json"),
        serde_json::to_string_pretty(&m).unwrap(),
    )
    .unwrap();
    m
}

/// Asserts `dir` holds exactly `expected` (plus the lock), byte for byte, and that the lock
/// records each file's size and SHA-256.
fn assert_downloaded(dir: &Path, expected: &BTreeMap<String, Vec<u8>>) -> Lock {
    let mut got = support::read_tree(dir);
    assert!(got.remove(hub::LOCK_FILE).is_some(), "no lock in {dir:?}");
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in expected {
        assert!(got[name] == *bytes, "{name} differs from the served bytes");
    }
    let lock = Lock::read(dir).unwrap();
    let mut recorded: BTreeMap<&String, _> = lock.main.files.iter().collect();
    for extra in lock.extras.values() {
        recorded.extend(extra.files.iter());
    }
    assert_eq!(recorded.len(), expected.len());
    for (name, bytes) in expected {
        let rec = recorded[name];
        assert_eq!(rec.size, bytes.len() as u64, "{name}");
        assert_eq!(rec.sha256, sha256_hex(bytes), "{name}");
    }
    lock
}

fn no_incomplete_files(dir: &Path) -> bool {
    !support::read_tree(dir)
        .keys()
        .any(|k| k.ends_with(".incomplete"))
}

/// An endpoint nobody listens on.
fn dead_endpoint() -> String {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", closed.local_addr().unwrap())
}

fn turbine() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_turbine"));
    for v in [
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "TURBINE_MODEL",
        "TURBINE_REPO",
        "TURBINE_REVISION",
        "TURBINE_DOWNLOAD_DIR",
        "TURBINE_MODELS_ROOT",
        "TURBINE_VAE",
        "TURBINE_OFFLINE",
    ] {
        c.env_remove(v);
    }
    c
}

#[test]
fn binary_downloads_a_repo_through_hf_endpoint() {
    let hub = FakeHub::start();
    let commit = hub.add_repo(TINY, support::tiny_model(), None);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    let out = turbine()
        .args(["download", "--repo", TINY, "--dir"])
        .arg(&dir)
        .env("HF_ENDPOINT", &hub.endpoint)
        .env("HF_HOME", tmp.path().join("hf-home"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    let lock = assert_downloaded(&dir, &support::tiny_model());
    assert_eq!(lock.main.repo, TINY);
    assert_eq!(lock.main.revision, "main");
    assert_eq!(lock.main.commit, commit);
    assert_eq!(lock.endpoint, hub.endpoint);
    let n = support::tiny_model().len();
    assert!(stdout.contains(&format!("{n} file(s)")), "{stdout}");
    assert!(stdout.contains(&commit[..12]), "{stdout}");
    // Files are fetched at the resolved commit, so a moving branch cannot mix two commits.
    let resolves: Vec<_> = hub
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/resolve/"))
        .collect();
    assert!(!resolves.is_empty());
    assert!(resolves
        .iter()
        .all(|r| r.path.contains(&format!("/resolve/{commit}/"))));
    // stderr is not a terminal here: no progress bar drawing, one log line per file instead.
    assert!(!stderr.contains('\r'), "{stderr}");
    assert!(stderr.contains(&format!("fetched {UNET}")), "{stderr}");

    // `--offline` re-hashes against the lock and never touches the endpoint.
    let before = hub.request_count();
    let out = turbine()
        .args(["download", "--offline", "--repo", TINY, "--dir"])
        .arg(&dir)
        .env("HF_ENDPOINT", &hub.endpoint)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("{n} file(s)")) && stdout.contains("verified offline"));
    assert_eq!(hub.request_count(), before);
}

#[test]
fn script_downloads_the_sdxl_turbo_manifest_with_the_vae_extra() {
    let hub = FakeHub::start();
    let turbo_commit = hub.add_repo(
        "stabilityai/sdxl-turbo",
        support::tiny_as_sdxl_turbo(),
        None,
    );
    let fix_commit = hub.add_repo(
        "madebyollin/sdxl-vae-fp16-fix",
        support::tiny_vae_fix(),
        None,
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sdxl-turbo");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/download_weights.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(["sdxl-turbo", "--vae", "fp16-fix", "--dir"])
        .arg(&dir)
        .env("TURBINE_BIN", env!("CARGO_BIN_EXE_turbine"))
        .env("HF_ENDPOINT", &hub.endpoint)
        .env("HF_HOME", tmp.path().join("hf-home"))
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut expected = support::tiny_as_sdxl_turbo();
    for (name, bytes) in support::tiny_vae_fix() {
        if name != "README.md" {
            expected.insert(format!("vae-fp16-fix/{name}"), bytes);
        }
    }
    let lock = assert_downloaded(&dir, &expected);
    assert_eq!(lock.model, "sdxl-turbo");
    assert_eq!(lock.main.commit, turbo_commit);
    assert_eq!(
        lock.extras["vae-fp16-fix"].repo,
        "madebyollin/sdxl-vae-fp16-fix"
    );
    assert_eq!(lock.extras["vae-fp16-fix"].commit, fix_commit);
    // Only the fp16 variants the manifest names (the look-alike has no others to offer, so
    // check the request log for the exact weight files).
    let weights: Vec<String> = hub
        .requests()
        .into_iter()
        .filter(|r| r.server == "hub" && r.method == "GET" && r.path.ends_with(".safetensors"))
        .map(|r| r.path.rsplit("/resolve/").next().unwrap().to_string())
        .map(|p| p.split_once('/').unwrap().1.to_string())
        .collect();
    assert_eq!(
        weights,
        [
            "text_encoder/model.fp16.safetensors",
            "text_encoder_2/model.fp16.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.safetensors",
        ]
    );

    // The same script against an endpoint nobody listens on: exit code 3 and the hint.
    let dead = dead_endpoint();
    let out = Command::new("bash")
        .arg(&script)
        .args(["sdxl-turbo", "--dir"])
        .arg(tmp.path().join("other"))
        .env("TURBINE_BIN", env!("CARGO_BIN_EXE_turbine"))
        .env("HF_ENDPOINT", &dead)
        .env("HF_HOME", tmp.path().join("hf-home"))
        .env("TURBINE_DOWNLOAD_RETRIES", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains(&format!("cannot reach {dead}")), "{stderr}");
    assert!(
        stderr.contains("HF_ENDPOINT=https://hf-mirror.com"),
        "{stderr}"
    );
}

#[test]
fn second_run_verifies_and_skips_present_files() {
    let hub = FakeHub::start();
    hub.add_repo(TINY, support::tiny_model(), None);
    let tmp = tempfile::tempdir().unwrap();
    let plan = repo_plan(&tmp.path().join("m"));
    let first = hub::download_blocking(&plan, &config(&hub)).unwrap();
    let n = support::tiny_model().len();
    assert_eq!(first.fetched.len(), n);
    let before = hub.request_count();
    let second = hub::download_blocking(&plan, &config(&hub)).unwrap();
    assert!(second.fetched.is_empty(), "{:?}", second.fetched);
    assert_eq!(second.already_present, n);
    let again = &hub.requests()[before..];
    // Only the commit lookup and one HEAD per file; no body was transferred.
    assert!(again
        .iter()
        .all(|r| r.method == "HEAD" || r.path.starts_with("/api/")));
    assert!(again.iter().all(|r| r.server == "hub"));
    assert_downloaded(&plan.dir, &support::tiny_model());
}

#[test]
fn interrupted_download_resumes_with_a_range_request_on_the_next_run() {
    let hub = FakeHub::start();
    hub.add_repo(TINY, support::tiny_model(), None);
    hub.drop_half_once(UNET);
    let tmp = tempfile::tempdir().unwrap();
    let plan = repo_plan(&tmp.path().join("m"));
    let cfg = config(&hub);

    let err = hub::download_blocking(&plan, &cfg).unwrap_err();
    assert!(matches!(err, HubError::Interrupted { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(UNET) && msg.contains("resume"), "{msg}");
    let final_path = plan.dir.join(UNET);
    let partial = hub::download::incomplete_path(&final_path);
    assert!(
        !final_path.exists(),
        "a partial file was left looking complete"
    );
    let kept = std::fs::metadata(&partial).unwrap().len();
    let full = support::tiny_model()[UNET].len() as u64;
    assert!(kept > 0 && kept < full, "kept {kept} of {full}");
    let lock = Lock::read(&plan.dir).unwrap();
    assert!(!lock.main.files.contains_key(UNET));

    let report = hub::download_blocking(&plan, &cfg).unwrap();
    // The interrupted file first, then those the first run never reached; none twice.
    assert_eq!(report.fetched[0], UNET);
    assert!(report
        .fetched
        .iter()
        .all(|f| !lock.main.files.contains_key(f)));
    assert_eq!(
        lock.main.files.len() + report.fetched.len(),
        support::tiny_model().len()
    );
    assert!(!partial.exists());
    assert_downloaded(&plan.dir, &support::tiny_model());
    let ranges: Vec<_> = hub
        .requests()
        .into_iter()
        .filter_map(|r| r.range.filter(|_| r.server == "cdn" && r.method == "GET"))
        .collect();
    assert_eq!(ranges, [format!("bytes={kept}-")]);
}

#[test]
fn a_dropped_connection_is_retried_within_one_run() {
    let hub = FakeHub::start();
    hub.add_repo(TINY, support::tiny_model(), None);
    hub.drop_half_once(UNET);
    let tmp = tempfile::tempdir().unwrap();
    let plan = repo_plan(&tmp.path().join("m"));
    let mut cfg = config(&hub);
    cfg.retries = 1;
    hub::download_blocking(&plan, &cfg).unwrap();
    assert_downloaded(&plan.dir, &support::tiny_model());
    assert!(hub
        .requests()
        .iter()
        .any(|r| r.server == "cdn" && r.range.as_deref().is_some_and(|r| r != "bytes=0-")));
}

#[test]
fn bytes_that_do_not_match_the_advertised_sha256_are_rejected() {
    let hub = FakeHub::start();
    hub.add_repo(TINY, support::tiny_model(), None);
    hub.corrupt(UNET);
    let tmp = tempfile::tempdir().unwrap();
    let plan = repo_plan(&tmp.path().join("m"));
    let err = hub::download_blocking(&plan, &config(&hub)).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            HubError::Checksum {
                algo: "SHA-256",
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("checksum mismatch for unet/diffusion_pytorch_model.safetensors"),
        "{msg}"
    );
    assert!(
        msg.contains(&sha256_hex(&support::tiny_model()[UNET])),
        "{msg}"
    );
    assert_eq!(err.exit_code(), 7);
    assert!(!plan.dir.join(UNET).exists());
    assert!(no_incomplete_files(&plan.dir));
    let lock = Lock::read(&plan.dir).unwrap();
    assert!(!lock.main.files.contains_key(UNET));
}

#[test]
fn small_files_are_checked_against_the_git_blob_sha1() {
    let hub = FakeHub::start();
    hub.add_repo(TINY, support::tiny_model(), None);
    hub.corrupt("unet/config.json");
    let tmp = tempfile::tempdir().unwrap();
    let plan = repo_plan(&tmp.path().join("m"));
    let err = hub::download_blocking(&plan, &config(&hub)).unwrap_err();
    assert!(
        matches!(
            err,
            HubError::Checksum {
                algo: "git blob SHA-1",
                ..
            }
        ),
        "{err}"
    );
    assert!(!plan.dir.join("unet/config.json").exists());
    assert!(no_incomplete_files(&plan.dir));
}

#[test]
fn a_corrupt_local_file_is_found_offline_and_fetched_again() {
    let hub = FakeHub::start();
    hub.add_repo(TINY, support::tiny_model(), None);
    let tmp = tempfile::tempdir().unwrap();
    let plan = repo_plan(&tmp.path().join("m"));
    hub::download_blocking(&plan, &config(&hub)).unwrap();
    hub::verify_offline(&plan, false).unwrap();

    let vae = "vae/diffusion_pytorch_model.safetensors";
    let path = plan.dir.join(vae);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&path, &bytes).unwrap();

    let before = hub.request_count();
    let err = hub::verify_offline(&plan, false).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HubError::Offline { .. }));
    assert!(
        msg.contains("SHA-256 differs") && msg.contains(vae),
        "{msg}"
    );
    assert_eq!(
        hub.request_count(),
        before,
        "offline verification used the network"
    );

    let report = hub::download_blocking(&plan, &config(&hub)).unwrap();
    assert_eq!(report.fetched, [vae]);
    assert_downloaded(&plan.dir, &support::tiny_model());
}

#[test]
fn offline_with_missing_files_fails_fast_naming_them_and_the_command() {
    let hub = FakeHub::start();
    hub.add_repo(TINY, support::tiny_model(), None);
    let tmp = tempfile::tempdir().unwrap();
    tiny_manifest(tmp.path());
    let args = ModelArgs {
        model: "tiny".into(),
        models_root: tmp.path().to_path_buf(),
        offline: true,
        ..Default::default()
    };
    let err = args.resolve_with(&config(&hub)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HubError::Offline { .. }), "{msg}");
    let n = support::tiny_model().len();
    assert!(msg.contains(&format!("{n} missing file(s)")), "{msg}");
    assert!(msg.contains(UNET), "{msg}");
    let command = format!(
        "`turbine download --model tiny --dir {}`",
        tmp.path().join("tiny").display()
    );
    assert!(msg.contains(&command), "{msg}");
    assert_eq!(err.exit_code(), 8);
    assert_eq!(hub.request_count(), 0);

    // HF_HUB_OFFLINE (as read into the config) means the same.
    let mut cfg = config(&hub);
    cfg.offline = true;
    let args = ModelArgs {
        offline: false,
        ..args
    };
    assert!(matches!(
        args.resolve_with(&cfg),
        Err(HubError::Offline { .. })
    ));
    assert_eq!(hub.request_count(), 0);
}

#[test]
fn missing_files_are_downloaded_on_first_use_then_resolved_without_the_network() {
    let hub = FakeHub::start();
    let commit = hub.add_repo(TINY, support::tiny_model(), None);
    let tmp = tempfile::tempdir().unwrap();
    tiny_manifest(tmp.path());
    let args = ModelArgs {
        model: "tiny".into(),
        models_root: tmp.path().to_path_buf(),
        ..Default::default()
    };
    let resolved = args.resolve_with(&config(&hub)).unwrap();
    let dir = tmp.path().join("tiny");
    assert_eq!(resolved.dir, dir);
    assert!(!resolved.random_weights);
    assert_eq!(resolved.origin, [(TINY.to_string(), commit.clone())]);
    let mut expected = support::tiny_model();
    expected.insert(
        "manifest.json".into(),
        std::fs::read(dir.join("manifest.json")).unwrap(),
    );
    let mut on_disk = support::read_tree(&dir);
    on_disk.remove(hub::LOCK_FILE);
    assert_eq!(on_disk, expected);

    let before = hub.request_count();
    for offline in [true, false] {
        let again = ModelArgs {
            offline,
            ..args.clone()
        }
        .resolve_with(&config(&hub))
        .unwrap();
        assert_eq!(again, resolved);
    }
    assert_eq!(
        hub.request_count(),
        before,
        "a complete directory needs no request"
    );

    // A requested revision the directory does not hold counts as missing.
    let err = ModelArgs {
        offline: true,
        revision: Some("v2".into()),
        ..args.clone()
    }
    .resolve_with(&config(&hub))
    .unwrap_err();
    assert!(
        err.to_string().contains("not test/tiny-sdxl at `v2`"),
        "{err}"
    );
    let ok = ModelArgs {
        offline: true,
        revision: Some(commit[..10].to_string()),
        ..args
    }
    .resolve_with(&config(&hub));
    assert!(ok.is_ok(), "a commit prefix of the locked commit matches");
}

#[test]
fn gated_repository_needs_the_token() {
    let hub = FakeHub::start();
    let repo = "acme/gated-tiny";
    hub.add_repo(repo, support::tiny_model(), Some("hf_sesame"));
    let tmp = tempfile::tempdir().unwrap();
    let plan = Plan::for_repo(repo, "main", &tmp.path().join("m")).unwrap();

    let err = hub::download_blocking(&plan, &config(&hub)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HubError::Auth { status: 401, .. }), "{msg}");
    assert!(
        msg.contains("No token was sent") && msg.contains("HF_TOKEN"),
        "{msg}"
    );
    assert!(msg.contains(repo) && msg.contains("restricted"), "{msg}");
    assert_eq!(err.exit_code(), 4);

    let mut wrong = config(&hub);
    wrong.token = Some("hf_wrong".into());
    wrong.token_source = TokenSource::Env;
    let msg = hub::download_blocking(&plan, &wrong)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("The token in HF_TOKEN was rejected"), "{msg}");
    assert!(
        !msg.contains("hf_wrong"),
        "the token must not be printed: {msg}"
    );

    let mut good = config(&hub);
    good.token = Some("hf_sesame".into());
    good.token_source = TokenSource::Env;
    hub::download_blocking(&plan, &good).unwrap();
    assert_downloaded(&plan.dir, &support::tiny_model());
    let log = hub.requests();
    assert!(log
        .iter()
        .any(|r| r.server == "hub" && r.authorization.as_deref() == Some("Bearer hf_sesame")));
    assert!(
        log.iter()
            .filter(|r| r.server == "cdn")
            .all(|r| r.authorization.is_none()),
        "the token went to the CDN"
    );
}

#[test]
fn binary_reads_the_token_from_hf_token_and_from_hf_home() {
    let hub = FakeHub::start();
    let repo = "acme/gated-tiny";
    hub.add_repo(repo, support::tiny_model(), Some("hf_sesame"));
    let tmp = tempfile::tempdir().unwrap();
    let run = |dir: &str, token: Option<&str>, home: &Path| {
        let mut c = turbine();
        c.args(["download", "--repo", repo, "--dir"])
            .arg(tmp.path().join(dir))
            .env("HF_ENDPOINT", &hub.endpoint)
            .env("HF_HOME", home);
        if let Some(t) = token {
            c.env("HF_TOKEN", t);
        }
        c.output().unwrap()
    };
    let empty_home = tmp.path().join("empty-home");
    let out = run("a", None, &empty_home);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("set HF_TOKEN=hf_..."), "{stderr}");

    let out = run("b", Some("hf_sesame"), &empty_home);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let home = tmp.path().join("logged-in");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("token"), "hf_sesame\n").unwrap();
    let out = run("c", None, &home);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_downloaded(&tmp.path().join("c"), &support::tiny_model());
}

#[test]
fn wrong_repository_revision_or_file_is_a_404_with_advice() {
    let hub = FakeHub::start();
    hub.add_repo(TINY, support::tiny_model(), None);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");

    let mut with_token = config(&hub);
    with_token.token = Some("hf_any".into());
    with_token.token_source = TokenSource::Env;
    let err = hub::download_blocking(
        &Plan::for_repo("test/nope", "main", &dir).unwrap(),
        &with_token,
    )
    .unwrap_err();
    assert!(matches!(err, HubError::NotFound { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("repository test/nope was not found"),
        "{err}"
    );
    assert_eq!(err.exit_code(), 5);

    let err = hub::download_blocking(&Plan::for_repo(TINY, "v9", &dir).unwrap(), &config(&hub))
        .unwrap_err();
    assert!(
        err.to_string().contains("revision `v9` of test/tiny-sdxl"),
        "{err}"
    );

    // A manifest naming a file the repository lacks fails before anything is transferred.
    let mut m = tiny_manifest(tmp.path());
    m.files
        .push("unet/diffusion_pytorch_model.fp16.safetensors".into());
    let plan = m.plan(&dir, None, None, None, true).unwrap();
    let err = hub::download_blocking(&plan, &config(&hub)).unwrap_err();
    assert!(
        err.to_string()
            .contains("unet/diffusion_pytorch_model.fp16.safetensors (in test/tiny-sdxl"),
        "{err}"
    );
    assert!(hub
        .requests()
        .iter()
        .all(|r| r.method != "GET" || r.path.starts_with("/api/")));
}

#[test]
fn unreachable_endpoint_suggests_a_mirror() {
    let endpoint = dead_endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = HubConfig::for_endpoint(&endpoint);
    cfg.retries = 0;
    let err = hub::download_blocking(&repo_plan(&tmp.path().join("m")), &cfg).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HubError::Unreachable { .. }), "{msg}");
    assert!(
        msg.contains("HF_ENDPOINT") && msg.contains(&endpoint),
        "{msg}"
    );
}

/// A mirror (or a proxy that inspects HTTPS) whose certificate a company CA signed: refused,
/// with what to do, while this machine does not trust the CA; downloaded from once
/// `SSL_CERT_FILE` names it, as for the machine's other tools. Before, only the bundled public
/// roots were trusted: no setting could make such a mirror work.
#[test]
fn a_mirror_signed_by_a_company_ca_is_trusted_through_ssl_cert_file() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let hub = FakeHub::start_https(&cert.pem(), &key.serialize_pem());
    hub.add_repo(TINY, support::tiny_model(), None);
    let tmp = tempfile::tempdir().unwrap();
    let ca_file = tmp.path().join("company-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let dir = tmp.path().join("tiny");
    let download = |ca: Option<&Path>| {
        let mut c = turbine();
        c.args(["download", "--repo", TINY, "--dir"])
            .arg(&dir)
            .env("HF_ENDPOINT", &hub.endpoint)
            .env("HF_HOME", tmp.path().join("hf-home"))
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR");
        if let Some(ca) = ca {
            c.env("SSL_CERT_FILE", ca);
        }
        c.output().unwrap()
    };

    let out = download(None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("localhost showed a certificate this machine does not trust")
            && stderr.contains("SSL_CERT_FILE"),
        "{stderr}"
    );
    assert_eq!(hub.request_count(), 0, "nothing reached the hub");

    let out = download(Some(&ca_file));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_downloaded(&dir, &support::tiny_model());
}

#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_is_reported_and_nothing_looks_complete() {
    // Writes to /dev/full fail with ENOSPC: aim the partial file of the UNet at it.
    assert!(Path::new("/dev/full").exists());
    let hub = FakeHub::start();
    hub.add_repo(TINY, support::tiny_model(), None);
    let tmp = tempfile::tempdir().unwrap();
    let plan = repo_plan(&tmp.path().join("m"));
    let target = plan.dir.join(UNET);
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink("/dev/full", hub::download::incomplete_path(&target)).unwrap();
    let err = hub::download_blocking(&plan, &config(&hub)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HubError::DiskFull { .. }), "{msg}");
    assert!(msg.contains("not enough disk space"), "{msg}");
    assert_eq!(err.exit_code(), 6);
    assert!(!target.exists());
}

#[test]
fn model_dir_and_random_weights_need_no_download() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = FakeHub::start();
    let cfg = config(&hub);
    let fixture = support::fixture_dir();

    let r = ModelArgs {
        model_dir: Some(fixture.clone()),
        ..Default::default()
    }
    .resolve_with(&cfg)
    .unwrap();
    assert_eq!(r.dir, fixture);
    assert!(!r.random_weights && r.vae_dir.is_none() && r.origin.is_empty());

    // The committed sdxl-turbo configs are enough for random weights.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let r = ModelArgs {
        models_root: root.clone(),
        random_weights: true,
        ..Default::default()
    }
    .resolve_with(&cfg)
    .unwrap();
    assert_eq!(r.dir, root.join("sdxl-turbo"));
    assert!(r.random_weights);

    let err = ModelArgs {
        model_dir: Some(tmp.path().join("absent")),
        ..Default::default()
    }
    .resolve_with(&cfg)
    .unwrap_err();
    assert!(err.to_string().contains("is not a directory"), "{err}");
    assert_eq!(hub.request_count(), 0);
}

#[test]
fn a_checkpoint_fetches_the_configs_and_tokenizers_but_no_weights() {
    use candle_core::{DType, Device};
    use turbine::model::pipeline::{GenerationSettings, ImageRequest, Pipeline};

    // `--checkpoint` with the sdxl-turbo manifest on a fresh models root: the configs and
    // tokenizers come from the Hub, the 7 GB of diffusers weights do not.
    let hub = FakeHub::start();
    hub.add_repo(
        "stabilityai/sdxl-turbo",
        support::tiny_as_sdxl_turbo(),
        None,
    );
    let tmp = tempfile::tempdir().unwrap();
    let checkpoint = support::checkpoint::tiny_checkpoint().to_path_buf();
    let args = ModelArgs {
        models_root: tmp.path().to_path_buf(),
        checkpoint: Some(checkpoint.clone()),
        ..Default::default()
    };
    let resolved = args.resolve_with(&config(&hub)).unwrap();
    assert_eq!(resolved.checkpoint.as_deref(), Some(checkpoint.as_path()));
    let on_disk = support::read_tree(&resolved.dir);
    assert!(
        on_disk.keys().all(|f| !f.ends_with(".safetensors")),
        "weights were downloaded: {:?}",
        on_disk.keys().collect::<Vec<_>>()
    );
    for f in [
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "tokenizer_2/vocab.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(on_disk.contains_key(f), "{f} was not fetched");
    }
    assert!(hub
        .requests()
        .iter()
        .all(|r| !r.path.ends_with(".safetensors")));
    assert!(
        resolved.to_string().contains("with weights from"),
        "{resolved}"
    );

    // The directory is complete for a checkpoint: offline, no request.
    let before = hub.request_count();
    let again = ModelArgs {
        offline: true,
        ..args.clone()
    }
    .resolve_with(&config(&hub))
    .unwrap();
    assert_eq!(again, resolved);
    assert_eq!(hub.request_count(), before);

    // And it makes images: the checkpoint's weights with the fetched configs and tokenizers.
    let p = Pipeline::load_checkpoint(
        &resolved.dir,
        &checkpoint,
        None,
        None,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let settings = GenerationSettings {
        width: 64,
        height: 64,
        steps: 1,
        guidance_scale: 0.0,
        init_step: None,
        adapter: None,
    };
    let item = ImageRequest {
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: String::new(),
        seed: 7,
        init_image: None,
        partials: None,
    };
    let images = p.generate(&settings, &[item], None).unwrap().images;
    let pixels = images[0].as_raw();
    assert!(pixels.iter().any(|&v| v != pixels[0]));

    // A checkpoint path that is not a file, and --model-dir without configs, are usage errors.
    let err = ModelArgs {
        checkpoint: Some(tmp.path().join("absent.safetensors")),
        ..args.clone()
    }
    .resolve_with(&config(&hub))
    .unwrap_err();
    assert!(err.to_string().contains("is not a file"), "{err}");
    let err = ModelArgs {
        model_dir: Some(tmp.path().to_path_buf()),
        ..args
    }
    .resolve_with(&config(&hub))
    .unwrap_err();
    assert!(err.to_string().contains("no model_index.json"), "{err}");

    // The repository's committed sdxl-turbo configs (no lock) are used without the network.
    let before = hub.request_count();
    let r = ModelArgs {
        models_root: Path::new(env!("CARGO_MANIFEST_DIR")).join("models"),
        checkpoint: Some(checkpoint),
        ..Default::default()
    }
    .resolve_with(&HubConfig::for_endpoint(&dead_endpoint()))
    .unwrap();
    assert!(r.dir.ends_with("models/sdxl-turbo"));
    assert_eq!(hub.request_count(), before);
}

/// A look-alike Hub with sdxl-turbo's repository (the tiny model under its file names) and its
/// manifest's two VAE extras.
fn hub_with_vaes() -> FakeHub {
    let hub = FakeHub::start();
    hub.add_repo(
        "stabilityai/sdxl-turbo",
        support::tiny_as_sdxl_turbo(),
        None,
    );
    hub.add_repo(
        "madebyollin/sdxl-vae-fp16-fix",
        support::tiny_vae_fix(),
        None,
    );
    hub.add_repo("madebyollin/taesdxl", support::tiny_taesd(), None);
    hub
}

#[test]
fn vae_extra_resolves_to_its_folder() {
    let hub = hub_with_vaes();
    let tmp = tempfile::tempdir().unwrap();
    let args = ModelArgs {
        models_root: tmp.path().to_path_buf(),
        vae: Some(hub::VaeVariant::Fp16Fix),
        ..Default::default()
    };
    let r = args.resolve_with(&config(&hub)).unwrap();
    let dir = tmp.path().join("sdxl-turbo");
    assert_eq!(r.vae_dir, Some(dir.join("vae-fp16-fix")));
    assert_eq!(r.origin.len(), 2);
    assert!(dir
        .join("vae-fp16-fix/diffusion_pytorch_model.safetensors")
        .is_file());
    // The same directory through --model-dir finds the extra too.
    let r2 = ModelArgs {
        model_dir: Some(dir.clone()),
        models_root: PathBuf::from("/nonexistent"),
        vae: Some(hub::VaeVariant::Fp16Fix),
        ..Default::default()
    }
    .resolve_with(&config(&hub))
    .unwrap();
    assert_eq!(r2.vae_dir, r.vae_dir);
}

/// `--preview-vae taesdxl` fetches TAESD beside the model (and beside `--vae`'s extra), and
/// resolves to its folder: online, offline once it is there, and through `--model-dir`, where a
/// missing folder is a usage error naming the command that fetches it.
#[test]
fn preview_vae_extra_is_fetched_beside_the_vae_and_resolves_to_its_folder() {
    let hub = hub_with_vaes();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sdxl-turbo");
    let args = ModelArgs {
        models_root: tmp.path().to_path_buf(),
        vae: Some(hub::VaeVariant::Fp16Fix),
        preview_vae: Some(hub::PreviewVae::Taesdxl),
        ..Default::default()
    };
    let r = args.resolve_with(&config(&hub)).unwrap();
    assert_eq!(r.vae_dir, Some(dir.join("vae-fp16-fix")));
    assert_eq!(r.preview_vae_dir, Some(dir.join("vae-taesdxl")));
    assert_eq!(r.origin.len(), 3, "{:?}", r.origin);
    assert_eq!(
        support::read_tree(&dir.join("vae-taesdxl")),
        support::tiny_taesd()
    );
    assert!(r.to_string().ends_with(&format!(
        "with VAE {} with previews by {}",
        dir.join("vae-fp16-fix").display(),
        dir.join("vae-taesdxl").display()
    )));

    // Present now: offline, the same flags resolve without a request; --preview-vae alone
    // asks for no other extra.
    let requests = hub.request_count();
    let offline = ModelArgs {
        offline: true,
        vae: None,
        ..args.clone()
    };
    let r = offline.resolve_with(&config(&hub)).unwrap();
    assert_eq!(r.vae_dir, None);
    assert_eq!(r.preview_vae_dir, Some(dir.join("vae-taesdxl")));
    assert_eq!(hub.request_count(), requests);

    // Through --model-dir, the folder is used as it is, or named with its command when absent.
    let by_dir = ModelArgs {
        model_dir: Some(dir.clone()),
        models_root: PathBuf::from("/nonexistent"),
        preview_vae: Some(hub::PreviewVae::Taesdxl),
        ..Default::default()
    };
    let r = by_dir.resolve_with(&config(&hub)).unwrap();
    assert_eq!(r.preview_vae_dir, Some(dir.join("vae-taesdxl")));
    std::fs::remove_dir_all(dir.join("vae-taesdxl")).unwrap();
    let err = by_dir.resolve_with(&config(&hub)).unwrap_err().to_string();
    assert!(
        err.contains("--preview-vae taesdxl with --model-dir")
            && err.contains(&format!(
                "turbine download --model sdxl-turbo --dir {} --preview-vae taesdxl",
                dir.display()
            )),
        "{err}"
    );
    // Offline, the missing folder is named with the command that fetches it.
    let err = offline.resolve_with(&config(&hub)).unwrap_err().to_string();
    assert!(err.contains("--preview-vae taesdxl"), "{err}");
    assert_eq!(hub.request_count(), requests);
}

#[test]
fn hf_hub_crate_downloads_from_the_look_alike() {
    // The look-alike answers the way the hf-hub client expects (Range 0-0 metadata through
    // the redirect, commit and ETag headers), not only the way turbine reads it.
    let hub = FakeHub::start();
    hub.add_repo(TINY, support::tiny_model(), None);
    let tmp = tempfile::tempdir().unwrap();
    let api = hf_hub::api::tokio::ApiBuilder::new()
        .with_endpoint(hub.endpoint.clone())
        .with_cache_dir(tmp.path().to_path_buf())
        .with_token(None)
        .with_progress(false)
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tiny = support::tiny_model();
    for file in [UNET, "unet/config.json"] {
        let path = rt
            .block_on(api.model(TINY.to_string()).download(file))
            .unwrap();
        assert!(std::fs::read(path).unwrap() == tiny[file], "{file}");
    }
}

#[test]
fn an_image_is_generated_from_the_downloaded_directory() {
    use candle_core::{DType, Device};
    use turbine::model::pipeline::{GenerationSettings, ImageRequest, Pipeline};

    // The tiny model published under stabilityai/sdxl-turbo's fp16 file names, fetched with
    // the real sdxl-turbo manifest on first use, as `turbine serve --model sdxl-turbo` would.
    let hub = FakeHub::start();
    hub.add_repo(
        "stabilityai/sdxl-turbo",
        support::tiny_as_sdxl_turbo(),
        None,
    );
    let tmp = tempfile::tempdir().unwrap();
    let resolved = ModelArgs {
        models_root: tmp.path().to_path_buf(),
        ..Default::default()
    }
    .resolve_with(&config(&hub))
    .unwrap();
    assert!(resolved
        .dir
        .join("unet/diffusion_pytorch_model.fp16.safetensors")
        .is_file());

    let settings = GenerationSettings {
        width: 64,
        height: 64,
        steps: 2,
        guidance_scale: 0.0,
        init_step: None,
        adapter: None,
    };
    let items = [ImageRequest {
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: String::new(),
        seed: 7,
        init_image: None,
        partials: None,
    }];
    let generate = |dir: &Path| {
        Pipeline::load(dir, &Device::Cpu, DType::F32)
            .unwrap()
            .generate(&settings, &items, None)
            .unwrap()
            .images
    };
    let downloaded = generate(&resolved.dir);
    assert_eq!(downloaded.len(), 1);
    assert_eq!(downloaded[0].dimensions(), (64, 64));
    let pixels = downloaded[0].as_raw();
    assert!(
        pixels.iter().any(|&p| p != pixels[0]),
        "a flat image is not a generated one"
    );
    // The same weights straight from the committed fixture give the same image.
    let reference = generate(&support::fixture_dir());
    assert!(downloaded[0] == reference[0]);
}

#[test]
fn two_downloads_into_one_directory_take_turns() {
    let hub = FakeHub::start();
    hub.add_repo(TINY, support::tiny_model(), None);
    let tmp = tempfile::tempdir().unwrap();
    let plan = repo_plan(&tmp.path().join("m"));
    let cfg = config(&hub);
    let reports: Vec<_> = std::thread::scope(|s| {
        let a = s.spawn(|| hub::download_blocking(&plan, &cfg).unwrap());
        let b = s.spawn(|| hub::download_blocking(&plan, &cfg).unwrap());
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    // One transferred everything, the other found it all present; nothing was fetched twice.
    let n = support::tiny_model().len();
    let fetched: usize = reports.iter().map(|r| r.fetched.len()).sum();
    assert_eq!(fetched, n);
    assert!(reports.iter().any(|r| r.already_present == n));
    assert_downloaded(&plan.dir, &support::tiny_model());
}

/// `turbine serve` started on an empty models root: its server process, its address once it
/// listens, and its log (read on).
struct Serving {
    child: std::process::Child,
    base: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Serving {
    /// Waits (up to 5 minutes) until `/health` answers 200.
    fn wait_ready(&self, client: &reqwest::blocking::Client) {
        let start = std::time::Instant::now();
        while client
            .get(format!("{}/health", self.base))
            .send()
            .unwrap()
            .status()
            != 200
        {
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "never became ready: {:?}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `turbine serve` on the CPU at 127.0.0.1:`port` with the weights under `models_root`, fetched
/// from `endpoint`.
fn serve_command(models_root: &Path, endpoint: &str, port: &str) -> Command {
    let mut c = turbine();
    c.args(["serve", "--models-root"])
        .arg(models_root)
        .args(["--device", "cpu", "--host", "127.0.0.1", "--port", port])
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", models_root.join("hf-home"))
        .env("NO_COLOR", "1");
    c
}

fn serve_from(hub: &FakeHub, models_root: &Path, extra: &[&str]) -> Serving {
    use std::io::BufRead;
    let mut child = serve_command(models_root, &hub.endpoint, "0")
        .args(["--min-image-side", "64", "--default-size", "64x64"])
        .args(["--warmup-images", "1"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let base = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            panic!(
                "the server exited before listening: {:?}",
                log.lock().unwrap()
            );
        };
        eprintln!("[server] {line}");
        log.lock().unwrap().push(line.clone());
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            eprintln!("[server] {line}");
            kept.lock().unwrap().push(line);
        }
    });
    Serving { child, base, log }
}

/// `turbine serve --model sdxl-turbo` whose weights are missing listens at once and downloads
/// them meanwhile: `/livez` answers 200 (`loading`) the whole time, `/health` and generations
/// 503, until the weights are in and warmed up. Before, the download came before listening,
/// so a liveness check (a Kubernetes `livenessProbe` gives up after 30 s by default; the real
/// weights take minutes) found nothing listening and restarted the server mid-download, over
/// and over.
#[test]
fn serve_listens_while_it_downloads_the_weights() {
    let hub = FakeHub::start();
    hub.add_repo(
        "stabilityai/sdxl-turbo",
        support::tiny_as_sdxl_turbo(),
        None,
    );
    hub.hold_files();
    let tmp = tempfile::tempdir().unwrap();
    let s = serve_from(&hub, tmp.path(), &[]);
    let client = reqwest::blocking::Client::new();
    let get = |path: &str| {
        let r = client.get(format!("{}{path}", s.base)).send().unwrap();
        let status = r.status().as_u16();
        (status, r.json::<serde_json::Value>().unwrap())
    };
    // The download is under way (its files are asked for and held).
    let start = std::time::Instant::now();
    while !hub.requests().iter().any(|r| r.server == "cdn") {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no download began"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, body) = get("/livez");
    assert_eq!(
        (status, &body["status"]),
        (200, &"loading".into()),
        "{body}"
    );
    let (status, body) = get("/health");
    assert_eq!(
        (status, &body["status"]),
        (503, &"loading".into()),
        "{body}"
    );
    let generate = || {
        client
            .post(format!("{}/v1/images/generations", s.base))
            .json(&serde_json::json!({"prompt": "a lighthouse at dusk"}))
            .send()
            .unwrap()
    };
    let r = generate();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["error"]["code"], "model_loading", "{body}");

    hub.release_files();
    while get("/health").0 != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "never became ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get("/livez"), (200, serde_json::json!({"status": "ok"})));
    let r = generate();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    // The prompt's tokens are counted once a worker has loaded the tokenizer it downloaded.
    let tokens = body["usage"]["input_tokens"].as_u64().unwrap();
    assert!(tokens >= 5, "{body}");
    let log = s.log.lock().unwrap().join("\n");
    assert!(log.contains("model: "), "{log}");
}

/// `turbine serve --checkpoint FILE` on an empty models root fetches the configs and
/// tokenizers only, loads the checkpoint's weights, and serves images from them; the log says
/// where the weights came from.
#[test]
fn serve_runs_a_single_file_checkpoint() {
    let hub = FakeHub::start();
    hub.add_repo(
        "stabilityai/sdxl-turbo",
        support::tiny_as_sdxl_turbo(),
        None,
    );
    let tmp = tempfile::tempdir().unwrap();
    let checkpoint = support::checkpoint::tiny_checkpoint().to_path_buf();
    let s = serve_from(
        &hub,
        tmp.path(),
        &["--checkpoint", checkpoint.to_str().unwrap()],
    );
    let client = reqwest::blocking::Client::new();
    s.wait_ready(&client);
    let r = client
        .post(format!("{}/v1/images/generations", s.base))
        .json(&serde_json::json!({"prompt": "a lighthouse at dusk", "seed": 3}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().unwrap();
    assert!(body["data"][0]["b64_json"].as_str().unwrap().len() > 100);
    assert!(hub
        .requests()
        .iter()
        .all(|r| !r.path.ends_with(".safetensors")));
    let log = s.log.lock().unwrap().join("\n");
    assert!(
        log.contains("with weights from") && log.contains("tiny_sdxl_turbo_fp16.safetensors"),
        "{log}"
    );
}

/// `serve --lora-modules NAME=FILE:SCALE` (and its environment variable) serves the LoRA under
/// NAME next to the model; a NAME that is already the model's is refused before anything loads.
/// With `--allow-runtime-lora-updating` and `--max-lora-modules`, adapters are loaded and
/// unloaded while serving (the `--lora-modules` one included), up to the limit.
#[test]
fn serve_serves_lora_modules_by_name() {
    let hub = FakeHub::start();
    hub.add_repo(
        "stabilityai/sdxl-turbo",
        support::tiny_as_sdxl_turbo(),
        None,
    );
    let tmp = tempfile::tempdir().unwrap();
    let lora = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference/lora_kohya.safetensors");
    let module = format!("ink={}:0.8", lora.display());
    let s = serve_from(
        &hub,
        tmp.path(),
        &[
            "--lora-modules",
            &module,
            "--allow-runtime-lora-updating",
            "--max-lora-modules",
            "2",
        ],
    );
    let client = reqwest::blocking::Client::new();
    s.wait_ready(&client);
    let models: serde_json::Value = client
        .get(format!("{}/v1/models", s.base))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"ink") && ids.contains(&"sdxl-turbo"),
        "{models}"
    );
    let image = |model: &str| -> String {
        let r = client
            .post(format!("{}/v1/images/generations", s.base))
            .json(&serde_json::json!({"prompt": "a lighthouse at dusk", "seed": 3, "model": model}))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = r.json().unwrap();
        body["data"][0]["b64_json"].as_str().unwrap().to_string()
    };
    assert_ne!(image("ink"), image("sdxl-turbo"));
    assert_eq!(image("sdxl-turbo"), image("gpt-image-1"));
    let log = s.log.lock().unwrap().join("\n");
    assert!(log.contains("adapter ink"), "{log}");
    // The request's log line names the adapter it ran.
    assert!(log.contains("adapter=ink"), "{log}");

    let post = |path: &str, body: serde_json::Value| {
        let r = client
            .post(format!("{}{path}", s.base))
            .json(&body)
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    // A folder, as diffusers saves a LoRA and as vLLM's clients name one.
    let wash = tmp.path().join("wash-lora");
    std::fs::create_dir(&wash).unwrap();
    std::fs::copy(
        lora.with_file_name("lora_diffusers.safetensors"),
        wash.join("pytorch_lora_weights.safetensors"),
    )
    .unwrap();
    let (status, text) = post(
        "/v1/load_lora_adapter",
        serde_json::json!({"lora_name": "wash", "lora_path": wash}),
    );
    assert_eq!(
        (status, text.as_str()),
        (200, "Success: LoRA adapter 'wash' added successfully.")
    );
    let washed = image("wash");
    assert_ne!(washed, image("sdxl-turbo"));
    assert_ne!(washed, image("ink"));
    let (status, text) = post(
        "/v1/load_lora_adapter",
        serde_json::json!({"lora_name": "third", "lora_path": wash}),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("too_many_lora_adapters"), "{text}");
    let (status, text) = post(
        "/v1/unload_lora_adapter",
        serde_json::json!({"lora_name": "ink"}),
    );
    assert_eq!(
        (status, text.as_str()),
        (200, "Success: LoRA adapter 'ink' removed successfully.")
    );
    let r = client
        .post(format!("{}/v1/images/generations", s.base))
        .json(&serde_json::json!({"prompt": "a lighthouse at dusk", "model": "ink"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(image("wash"), washed);

    let out = serve_command(tmp.path(), &hub.endpoint, "0")
        .env(
            "TURBINE_LORA_MODULES",
            format!("sdxl-turbo={}", lora.display()),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--lora-modules sdxl-turbo"), "{stderr}");
}

/// A download that fails now fails a server that is already listening: it still exits with
/// the download's exit code (3) and its message, as `turbine download` would; and a port that
/// is taken is said before any download begins.
#[test]
fn serve_exits_with_the_downloads_error() {
    let endpoint = dead_endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let out = serve_command(tmp.path(), &endpoint, "0").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("listening on http://127.0.0.1:"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&endpoint) && stderr.contains("HF_ENDPOINT"),
        "{stderr}"
    );
    // The download is no device's doing.
    assert!(stderr.contains("error: cannot reach"), "{stderr}");

    let hub = FakeHub::start();
    hub.add_repo(
        "stabilityai/sdxl-turbo",
        support::tiny_as_sdxl_turbo(),
        None,
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = serve_command(tmp.path(), &hub.endpoint, &port)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
    assert_eq!(hub.request_count(), 0, "no download before listening");
}
