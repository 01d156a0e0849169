//! The control socket and the CLI, end to end: a mock [`ControlHandler`]
//! behind the real socket, the real client, and the built `smtpguard`
//! binary. Two tests run the CLI as an unprivileged user with `setpriv`
//! and so need root: they are `#[ignore]`d for a plain `cargo test`, and
//! `cargo xtask test` (as root) runs them with `--include-ignored`.

use std::{
    collections::BTreeMap,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Output,
    sync::{Arc, Mutex},
    time::Duration,
};

use smtpguard::control::{
    self,
    proto::{
        Admission, CheckView, Checked, Enforcement, EntryView, Exported, ImportResult,
        InterfaceView, LineIssue, ListChanged, ListEntries, ListName, ListSize, ModeSet,
        PolicyMode, Reloaded, SourceView, StatsView, StatusView, TopEntry,
    },
    render, Client, ClientError, ControlHandler, PeerInfo, Request, Response,
};
use smtpguard::testing::{self, TempDir};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_smtpguard");
const NOBODY: u32 = 65534;
/// Every test finishes well within this, or fails.
const LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- fixtures

fn entry(prefix: &str) -> EntryView {
    EntryView {
        prefix: prefix.to_owned(),
        ..Default::default()
    }
}

fn deny_entries() -> ListEntries {
    ListEntries {
        list: ListName::Deny,
        entries: vec![
            EntryView {
                prefix: "203.0.113.0/24".into(),
                comment: Some("spam run".into()),
                expires_at_unix: Some(1_795_953_600),
                hits: Some(42),
                source: None,
            },
            EntryView {
                prefix: "198.51.100.66/32".into(),
                comment: None,
                expires_at_unix: None,
                hits: Some(7),
                source: None,
            },
            EntryView {
                prefix: "2001:db8::/32".into(),
                comment: Some("test net".into()),
                expires_at_unix: None,
                hits: Some(0),
                source: None,
            },
        ],
    }
}

fn check_view(address: &str) -> CheckView {
    if address.starts_with("203.0.113.") {
        CheckView {
            address: address.to_owned(),
            mode: PolicyMode::AcceptAllExceptDeny,
            enforcement: Enforcement::Enforce,
            deny_match: Some(entry("203.0.113.0/24")),
            permit_match: None,
            protected: None,
            overridden: Vec::new(),
            verdict: Admission::Refuse,
            reason: "deny list 203.0.113.0/24".into(),
        }
    } else {
        CheckView {
            address: address.to_owned(),
            mode: PolicyMode::AcceptAllExceptDeny,
            enforcement: Enforcement::Monitor,
            deny_match: None,
            permit_match: None,
            protected: None,
            overridden: Vec::new(),
            verdict: Admission::Accept,
            reason: "on neither list".into(),
        }
    }
}

fn stats_view() -> StatsView {
    StatsView {
        xdp: Some(BTreeMap::from([
            ("syn_dropped_deny".to_owned(), 56),
            ("syn_passed".to_owned(), 1234),
        ])),
        front_door: BTreeMap::from([
            ("accepted".to_owned(), 42),
            ("rejected_policy".to_owned(), 3),
        ]),
        gauges: BTreeMap::from([("open_connections".to_owned(), 2)]),
        top_entries: vec![
            TopEntry {
                list: ListName::Deny,
                prefix: "203.0.113.0/24".into(),
                hits: 56,
            },
            TopEntry {
                list: ListName::Permit,
                prefix: "198.51.100.7/32".into(),
                hits: 9,
            },
        ],
        clients: BTreeMap::new(),
        dnsbl: BTreeMap::new(),
    }
}

fn status_view() -> StatusView {
    StatusView {
        fleet: None,
        version: "0.1.0".into(),
        uptime_secs: 3 * 3600 + 2 * 60 + 1,
        interfaces: vec![InterfaceView {
            name: "eth0".into(),
            xdp_mode: "native".into(),
            pinned: "yes (/sys/fs/bpf/smtpguard/eth0-native)".into(),
        }],
        ports: vec![25, 587],
        deny_list_size: ListSize { ipv4: 10, ipv6: 2 },
        permit_list_size: ListSize { ipv4: 1, ipv6: 0 },
        sources: vec![
            SourceView {
                name: "local".into(),
                deny: ListSize { ipv4: 2, ipv6: 0 },
                permit: ListSize { ipv4: 1, ipv6: 0 },
                loaded_at_unix: 1_795_953_600,
            },
            SourceView {
                name: "ipsum".into(),
                deny: ListSize { ipv4: 8, ipv6: 2 },
                permit: ListSize::default(),
                loaded_at_unix: 1_795_953_600,
            },
        ],
        protected: vec!["127.0.0.0/8 (loopback)".into(), "::1/128 (loopback)".into()],
        mode: PolicyMode::AcceptAllExceptDeny,
        enforcement: Enforcement::Enforce,
        open_connections: 3,
        max_connections: Some(100),
        tls_mode: "optional".into(),
        certificate_not_after_unix: Some(1_795_953_600),
        delivery: "upstream 127.0.0.1:10025 (proxy-v2)".into(),
        control_socket: "/run/smtpguard/control.sock".into(),
    }
}

// ------------------------------------------------------------ mock daemon

/// Answers every request with a canned reply and records what it got.
/// An entry `"fail"` gets an error reply, an entry `"panic"` panics.
#[derive(Default)]
struct Mock {
    seen: Mutex<Vec<(Request, PeerInfo)>>,
}

impl Mock {
    fn seen(&self) -> Vec<Request> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(r, _)| r.clone())
            .collect()
    }
}

fn canned(request: &Request) -> Response {
    match request {
        Request::ListAdd { list, entries, .. } | Request::ListRemove { list, entries, .. } => {
            if entries.iter().any(|e| e == "panic") {
                panic!("the mock was asked to panic");
            }
            if entries.iter().any(|e| e == "fail") {
                return Response::error("fail: not an IP address or prefix");
            }
            Response::ListChanged(ListChanged {
                list: *list,
                source: "local".into(),
                added: entries.len() as u64,
                removed: 0,
                unchanged: 1,
                warnings: vec!["203.0.113.9/32 is covered by 203.0.113.0/24".into()],
                list_size: 15,
            })
        }
        Request::ListShow { list, .. } => Response::ListEntries(ListEntries {
            list: *list,
            ..deny_entries()
        }),
        Request::Import {
            list,
            source_name,
            text,
            dry_run,
            skip_invalid,
            ..
        } => {
            let bad: Vec<LineIssue> = text
                .lines()
                .enumerate()
                .filter(|(_, l)| l.starts_with("bad"))
                .map(|(i, _)| LineIssue {
                    source: source_name.clone(),
                    line: i as u64 + 1,
                    column: 1,
                    reason: "not an IP address or prefix".into(),
                })
                .collect();
            Response::ImportResult(ImportResult {
                list: *list,
                added: (text.lines().count() - bad.len()) as u64,
                applied: !dry_run && (bad.is_empty() || *skip_invalid),
                rejected: !bad.is_empty() && !*skip_invalid,
                list_size: 1000,
                skipped: bad,
                ..Default::default()
            })
        }
        Request::Export { list, .. } => Response::Exported(Exported {
            list: *list,
            text: "203.0.113.0/24 # spam run\n2001:db8::/32\n".into(),
        }),
        Request::SetMode { mode, enforcement } => Response::ModeSet(ModeSet {
            mode: mode.unwrap_or(PolicyMode::AcceptAllExceptDeny),
            enforcement: enforcement.unwrap_or(Enforcement::Enforce),
        }),
        Request::Check { addresses } => Response::Checked(Checked {
            results: addresses.iter().map(|a| check_view(a)).collect(),
        }),
        Request::Stats { .. } => Response::Stats(stats_view()),
        Request::Status => Response::Status(status_view()),
        Request::Reload => Response::Reloaded(Reloaded {
            summary: "deny list: 3 added, 1 removed\npermit list: nothing changed".into(),
        }),
        Request::Sessions => Response::Sessions(Default::default()),
        Request::Kick { target } => Response::Kicked(control::proto::Kicked {
            target: target.clone(),
            sessions: Vec::new(),
        }),
    }
}

impl ControlHandler for Mock {
    async fn handle(
        &self,
        request: Request,
        peer: PeerInfo,
        _client: control::ClientWaiting,
    ) -> Response {
        self.seen.lock().unwrap().push((request.clone(), peer));
        canned(&request)
    }
}

/// Where a test's control socket goes: in a directory `bind` creates.
fn socket_in(dir: &TempDir) -> PathBuf {
    dir.join("run/control.sock")
}

/// A mock daemon serving on a fresh socket.
struct Daemon {
    dir: TempDir,
    socket: PathBuf,
    mock: Arc<Mock>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), control::ControlError>>,
}

impl Daemon {
    fn start() -> Daemon {
        Daemon::start_with(|_| {})
    }

    fn start_with(adjust: impl FnOnce(&mut control::ControlListener)) -> Daemon {
        let dir = TempDir::new("ctl");
        let socket = socket_in(&dir);
        let mut listener = control::bind(&socket).expect("bind");
        adjust(&mut listener);
        let mock = Arc::new(Mock::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(control::run(listener, Arc::clone(&mock), shutdown.clone()));
        Daemon {
            dir,
            socket,
            mock,
            shutdown,
            task,
        }
    }

    fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
        assert!(
            !self.socket.exists(),
            "the socket file is removed on shutdown"
        );
        drop(self.dir);
    }
}

/// Runs the built binary with `args`, bounded in time.
async fn cli(args: &[&str]) -> Output {
    cli_with(tokio::process::Command::new(BIN).args(args)).await
}

/// Runs the built binary as uid/gid 65534 (nobody), through setpriv.
async fn cli_as_nobody(args: &[&str]) -> Output {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (it runs the CLI as another user with setpriv)"
    );
    cli_with(
        tokio::process::Command::new("setpriv")
            .args([
                format!("--reuid={NOBODY}"),
                format!("--regid={NOBODY}"),
                "--clear-groups".to_owned(),
                BIN.to_owned(),
            ])
            .args(args),
    )
    .await
}

async fn cli_with(command: &mut tokio::process::Command) -> Output {
    let child = command
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(LIMIT, child)
        .await
        .expect("the CLI finished in time")
        .expect("the CLI ran")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs an async test body on a multi-threaded runtime (the CLI child
/// process needs the server to keep serving), bounded by [`LIMIT`].
fn bounded<F: std::future::Future<Output = ()>>(body: F) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(testing::bounded(LIMIT, body));
}

// ------------------------------------------------------------ round trips

fn every_request() -> Vec<Request> {
    vec![
        Request::ListAdd {
            list: ListName::Deny,
            entries: vec!["203.0.113.0/24".into(), "2001:db8::1".into()],
            expires_in_secs: Some(3600),
            comment: Some("spam run".into()),
            allow_all: false,
            source: None,
            force: false,
            wait_fleet: false,
        },
        Request::ListRemove {
            list: ListName::Permit,
            entries: vec!["198.51.100.7".into()],
            source: None,
            wait_fleet: false,
        },
        Request::ListShow {
            list: ListName::Deny,
            source: None,
        },
        Request::Import {
            list: ListName::Deny,
            source_name: "ipsum.txt".into(),
            text: "203.0.113.1\n# comment\n\"quoted\"\ttab\n".into(),
            replace: true,
            dry_run: true,
            skip_invalid: true,
            allow_all: true,
            allow_empty: true,
            source: None,
        },
        Request::Export {
            list: ListName::Permit,
            source: None,
        },
        Request::SetMode {
            mode: Some(PolicyMode::DenyAllExceptPermit),
            enforcement: Some(Enforcement::Monitor),
        },
        Request::Check {
            addresses: vec!["203.0.113.9".into(), "2001:db8::1".into()],
        },
        Request::Stats { top: 5 },
        Request::Status,
        Request::Reload,
    ]
}

#[test]
fn every_request_round_trips_through_the_socket() {
    bounded(async {
        let daemon = Daemon::start();
        let client = daemon.client();
        for request in every_request() {
            let reply = client.request(&request).await.unwrap();
            assert_eq!(reply, canned(&request), "reply to {}", request.op());
        }
        assert_eq!(daemon.mock.seen(), every_request());
        let peer = daemon.mock.seen.lock().unwrap()[0].1;
        assert_eq!(peer.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(peer.pid, Some(std::process::id() as i32));
        // An error reply comes back as such, and `call` turns it into Err.
        let failing = Request::ListAdd {
            list: ListName::Deny,
            entries: vec!["fail".into()],
            expires_in_secs: None,
            comment: None,
            allow_all: false,
            source: None,
            force: false,
            wait_fleet: false,
        };
        assert_eq!(
            client.request(&failing).await.unwrap(),
            Response::Error("fail: not an IP address or prefix".into())
        );
        match client.call(&failing).await {
            Err(ClientError::Daemon(m)) => assert_eq!(m, "fail: not an IP address or prefix"),
            other => panic!("{other:?}"),
        }
        daemon.stop().await;
    });
}

#[test]
fn wire_format_is_tagged_json() {
    assert_eq!(
        serde_json::to_string(&Request::Status).unwrap(),
        r#"{"op":"status"}"#
    );
    assert_eq!(
        serde_json::to_string(&Response::Error("no".into())).unwrap(),
        r#"{"error":"no"}"#
    );
    assert_eq!(
        serde_json::to_string(&Request::SetMode {
            mode: None,
            enforcement: Some(Enforcement::Monitor)
        })
        .unwrap(),
        r#"{"op":"set_mode","mode":null,"enforcement":"monitor"}"#
    );
    // Optional fields and flags may be left out by hand-written requests.
    let minimal: Request =
        serde_json::from_str(r#"{"op":"list_add","list":"deny","entries":["192.0.2.1"]}"#).unwrap();
    assert_eq!(
        minimal,
        Request::ListAdd {
            list: ListName::Deny,
            entries: vec!["192.0.2.1".into()],
            expires_in_secs: None,
            comment: None,
            allow_all: false,
            source: None,
            force: false,
            wait_fleet: false,
        }
    );
    let reply = Response::ModeSet(ModeSet {
        mode: PolicyMode::DenyAllExceptPermit,
        enforcement: Enforcement::Off,
    });
    assert_eq!(
        serde_json::to_string(&reply).unwrap(),
        r#"{"mode_set":{"mode":"deny-all-except-permit","enforcement":"off"}}"#
    );
    for request in every_request() {
        let json = serde_json::to_string(&request).unwrap();
        assert!(!json.contains('\n'));
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), request);
    }
    assert_eq!(
        Response::error("two\nlines"),
        Response::Error("two lines".into())
    );
}

#[test]
fn a_large_import_is_sent_whole() {
    bounded(async {
        let daemon = Daemon::start();
        // About 3 MB, more than ipsum.txt.
        let text: String = (0..200_000u32)
            .map(|i| format!("10.{}.{}.{}\t3\n", i >> 16, (i >> 8) & 255, i & 255))
            .collect();
        assert!(text.len() > 2_000_000);
        let request = Request::Import {
            list: ListName::Deny,
            source_name: "ipsum.txt".into(),
            text: text.clone(),
            replace: false,
            dry_run: false,
            skip_invalid: false,
            allow_all: false,
            allow_empty: false,
            source: None,
        };
        match daemon.client().call(&request).await.unwrap() {
            Response::ImportResult(r) => assert_eq!(r.added, 200_000),
            other => panic!("{other:?}"),
        }
        assert_eq!(daemon.mock.seen(), vec![request]);
        daemon.stop().await;
    });
}

// ----------------------------------------------------- rendering (golden)

#[test]
fn human_rendering() {
    assert_eq!(
        render::list_entries(&deny_entries()),
        "\
203.0.113.0/24    expires 2026-11-29T12:00:00Z  hits 42  # spam run
198.51.100.66/32                                hits 7
2001:db8::/32                                   hits 0   # test net
"
    );
    assert_eq!(
        render::list_entries(&ListEntries {
            list: ListName::Permit,
            entries: vec![entry("192.0.2.7/32"), entry("2001:db8::/48")],
        }),
        "192.0.2.7/32\n2001:db8::/48\n"
    );
    assert_eq!(render::list_entries(&ListEntries::default()), "");
    assert_eq!(
        render::checked(&Checked {
            results: vec![check_view("203.0.113.9"), check_view("192.0.2.1")],
        }),
        "\
203.0.113.9: refuse (deny list 203.0.113.0/24; mode accept-all-except-deny)
192.0.2.1: accept (on neither list; mode accept-all-except-deny; enforcement monitor)
"
    );
    assert_eq!(
        render::stats(&stats_view()),
        "\
xdp.syn_dropped_deny          56
xdp.syn_passed              1234
front_door.accepted           42
front_door.rejected_policy     3
open_connections               2

deny    203.0.113.0/24   56 hits
permit  198.51.100.7/32   9 hits
"
    );
    let no_xdp = StatsView {
        xdp: None,
        top_entries: vec![],
        ..stats_view()
    };
    assert_eq!(
        render::stats(&no_xdp),
        "\
xdp: not attached
front_door.accepted         42
front_door.rejected_policy   3
open_connections             2
"
    );
    let mut later = stats_view();
    later
        .xdp
        .as_mut()
        .unwrap()
        .insert("syn_dropped_deny".into(), 106);
    later.front_door.insert("accepted".into(), 40); // went down: restarted
    later.gauges.insert("open_connections".into(), 5);
    later.top_entries[0].hits = 81;
    assert_eq!(
        render::stats_rates(&stats_view(), &later, Duration::from_secs(5)),
        "\
counter                     total  per second
xdp.syn_dropped_deny          106        10.0
xdp.syn_passed               1234         0.0
front_door.accepted            40       reset
front_door.rejected_policy      3         0.0
open_connections                5

list    prefix           hits  per second
deny    203.0.113.0/24     81         5.0
permit  198.51.100.7/32     9         0.0
"
    );
    assert_eq!(
        render::status(&status_view()),
        "\
version:         0.1.0
uptime:          3h 2m 1s
xdp:             eth0 (native, pinned: yes (/sys/fs/bpf/smtpguard/eth0-native))
ports:           25, 587
mode:            accept-all-except-deny
enforcement:     enforce
deny list:       12 entries (10 IPv4, 2 IPv6)
permit list:     1 entry (1 IPv4, 0 IPv6)
source local:    deny 2, permit 1, loaded 2026-11-29T12:00:00Z
source ipsum:    deny 10, permit 0, loaded 2026-11-29T12:00:00Z
protected:       127.0.0.0/8 (loopback), ::1/128 (loopback)
connections:     3 open, max 100
tls:             optional, certificate expires 2026-11-29T12:00:00Z
delivery:        upstream 127.0.0.1:10025 (proxy-v2)
control socket:  /run/smtpguard/control.sock
"
    );
    assert_eq!(
        render::list_changed(&ListChanged {
            list: ListName::Deny,
            added: 2,
            unchanged: 1,
            list_size: 15,
            ..Default::default()
        }),
        "deny list: 2 added, 1 unchanged; 15 entries\n"
    );
    let import = ImportResult {
        list: ListName::Permit,
        added: 1000,
        duplicates: 2,
        skipped: vec![LineIssue {
            source: "ipsum.txt".into(),
            line: 12,
            column: 5,
            reason: "not an IP address".into(),
        }],
        applied: false,
        list_size: 1000,
        ..Default::default()
    };
    assert_eq!(
        render::import_result(&import, true),
        "permit list (dry run): 1000 added, 2 duplicates, 1 skipped; 1000 entries\n"
    );
    assert_eq!(
        render::line_issue(&import.skipped[0]),
        "ipsum.txt:12:5: not an IP address"
    );
    assert_eq!(
        render::mode_set(&ModeSet {
            mode: PolicyMode::DenyAllExceptPermit,
            enforcement: Enforcement::Monitor
        }),
        "mode deny-all-except-permit, enforcement monitor (kept across reloads and restarts in the state file)\n"
    );
}

// ------------------------------------------------------ the CLI, end to end

#[test]
fn cli_human_output() {
    bounded(async {
        let daemon = Daemon::start();
        let sock = s(&daemon.socket);

        let o = cli(&["check", "203.0.113.9", "--socket", sock]).await;
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            stdout(&o),
            "203.0.113.9: refuse (deny list 203.0.113.0/24; mode accept-all-except-deny)\n"
        );

        let o = cli(&["--socket", sock, "deny", "list"]).await;
        assert_eq!(stdout(&o), render::list_entries(&deny_entries()));
        assert!(stdout(&o)
            .starts_with("203.0.113.0/24    expires 2026-11-29T12:00:00Z  hits 42  # spam run\n"));

        let o = cli(&["stats", "--socket", sock]).await;
        assert_eq!(stdout(&o), render::stats(&stats_view()));
        let o = cli(&["status", "--socket", sock]).await;
        assert_eq!(stdout(&o), render::status(&status_view()));
        assert!(stdout(&o).contains("\nconnections:     3 open, max 100\n"));

        let o = cli(&[
            "deny",
            "add",
            "203.0.113.0/24",
            "--for",
            "1h",
            "--comment",
            "spam run",
            "--socket",
            sock,
        ])
        .await;
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(stdout(&o), "deny list: 1 added, 1 unchanged; 15 entries\n");
        assert_eq!(
            stderr(&o),
            "smtpguard: warning: 203.0.113.9/32 is covered by 203.0.113.0/24\n"
        );

        let o = cli(&["--socket", sock, "permit", "del", "198.51.100.7"]).await;
        assert!(o.status.success(), "{}", stderr(&o));
        let o = cli(&["--socket", sock, "mode", "monitor"]).await;
        assert_eq!(
            stdout(&o),
            "mode accept-all-except-deny, enforcement monitor (kept across reloads and restarts in the state file)\n"
        );
        let o = cli(&["--socket", sock, "mode", "deny-all-except-permit"]).await;
        assert_eq!(
            stdout(&o),
            "mode deny-all-except-permit, enforcement enforce (kept across reloads and restarts in the state file)\n"
        );
        let o = cli(&["--socket", sock, "reload"]).await;
        assert_eq!(
            stdout(&o),
            "deny list: 3 added, 1 removed\npermit list: nothing changed\n"
        );
        let o = cli(&["--socket", sock, "stats", "--top", "3"]).await;
        assert!(o.status.success());

        assert_eq!(
            &daemon.mock.seen()[4..],
            &[
                Request::ListAdd {
                    list: ListName::Deny,
                    entries: vec!["203.0.113.0/24".into()],
                    expires_in_secs: Some(3600),
                    comment: Some("spam run".into()),
                    allow_all: false,
                    source: None,
                    force: false,
                    wait_fleet: false,
                },
                Request::ListRemove {
                    list: ListName::Permit,
                    entries: vec!["198.51.100.7".into()],
                    source: None,
                    wait_fleet: false,
                },
                Request::SetMode {
                    mode: None,
                    enforcement: Some(Enforcement::Monitor),
                },
                Request::SetMode {
                    mode: Some(PolicyMode::DenyAllExceptPermit),
                    enforcement: None,
                },
                Request::Reload,
                Request::Stats { top: 3 },
            ]
        );

        // An error reply: one line on stderr, exit status 1.
        let o = cli(&["--socket", sock, "deny", "add", "fail"]).await;
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(
            stderr(&o),
            "smtpguard: error: fail: not an IP address or prefix\n"
        );
        assert_eq!(stdout(&o), "");
        daemon.stop().await;
    });
}

#[test]
fn cli_json_output() {
    bounded(async {
        let daemon = Daemon::start();
        let sock = s(&daemon.socket);

        let o = cli(&["--json", "check", "203.0.113.9", "--socket", sock]).await;
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            stdout(&o),
            r#"{
  "results": [
    {
      "address": "203.0.113.9",
      "mode": "accept-all-except-deny",
      "enforcement": "enforce",
      "deny_match": {
        "prefix": "203.0.113.0/24",
        "comment": null,
        "expires_at_unix": null,
        "hits": null,
        "source": null
      },
      "permit_match": null,
      "protected": null,
      "overridden": [],
      "verdict": "refuse",
      "reason": "deny list 203.0.113.0/24"
    }
  ]
}
"#
        );
        let o = cli(&["deny", "list", "--json", "--socket", sock]).await;
        let got: ListEntries = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(got, deny_entries());
        let o = cli(&["stats", "--json", "--socket", sock]).await;
        let got: StatsView = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(got, stats_view());
        let o = cli(&["status", "--json", "--socket", sock]).await;
        let got: StatusView = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(got, status_view());
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["uptime_secs"], 10921);
        assert_eq!(v["deny_list_size"]["ipv6"], 2);
        daemon.stop().await;
    });
}

#[test]
fn cli_import_and_export() {
    bounded(async {
        let daemon = Daemon::start();
        let sock = s(&daemon.socket);
        let dir = daemon.dir.path();

        let file = dir.join("new.list");
        std::fs::write(&file, "203.0.113.1\nbad line\n198.51.100.0/24\n").unwrap();
        let f = s(&file);
        // Invalid lines without --skip-invalid: listed, not applied, failure.
        let o = cli(&["--socket", sock, "import", "deny", f]).await;
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(
            stdout(&o),
            "deny list: nothing imported, 1 invalid line(s); 1000 entries\n"
        );
        assert_eq!(
            stderr(&o),
            format!(
                "{f}:2:1: not an IP address or prefix\nsmtpguard: error: import into the deny list not applied: 1 invalid line(s) (fix them, or import the rest with --skip-invalid)\n"
            )
        );
        let o = cli(&["--socket", sock, "import", "deny", f, "--skip-invalid"]).await;
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(stdout(&o), "deny list: 2 added, 1 skipped; 1000 entries\n");
        // A dry run fails exactly as the real import would.
        let o = cli(&[
            "--socket",
            sock,
            "import",
            "permit",
            f,
            "--dry-run",
            "--replace",
            "--allow-empty",
        ])
        .await;
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert_eq!(
            stdout(&o),
            "permit list (dry run): nothing would be imported, 1 invalid line(s); 1000 entries\n"
        );
        assert_eq!(
            stderr(&o),
            format!(
                "{f}:2:1: not an IP address or prefix\nsmtpguard: error: import into the permit list would not be applied: 1 invalid line(s) (fix them, or import the rest with --skip-invalid)\n"
            )
        );
        match &daemon.mock.seen()[2] {
            Request::Import {
                list,
                source_name,
                text,
                replace,
                dry_run,
                skip_invalid,
                allow_all,
                allow_empty,
                ..
            } => {
                assert_eq!(*list, ListName::Permit);
                assert_eq!(source_name, f);
                assert_eq!(text, "203.0.113.1\nbad line\n198.51.100.0/24\n");
                assert!(*replace && *dry_run && !*skip_invalid && !*allow_all && *allow_empty);
            }
            other => panic!("{other:?}"),
        }
        let o = cli(&[
            "--socket",
            sock,
            "import",
            "permit",
            f,
            "--dry-run",
            "--skip-invalid",
        ])
        .await;
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            stdout(&o),
            "permit list (dry run): 2 added, 1 skipped; 1000 entries\n"
        );

        // A missing file is the client's error, naming the file.
        let missing = dir.join("missing.list");
        let o = cli(&["--socket", sock, "import", "deny", s(&missing)]).await;
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(
            stderr(&o),
            format!(
                "smtpguard: error: cannot read {}: no such file or directory\n",
                missing.display()
            )
        );

        // Standard input.
        let mut child = tokio::process::Command::new(BIN)
            .args(["--socket", sock, "import", "deny", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"192.0.2.1\n").await.unwrap();
        drop(stdin);
        let o = child.wait_with_output().await.unwrap();
        assert!(o.status.success());
        match daemon.mock.seen().last().unwrap() {
            Request::Import {
                source_name, text, ..
            } => {
                assert_eq!(source_name, "<stdin>");
                assert_eq!(text, "192.0.2.1\n");
            }
            other => panic!("{other:?}"),
        }

        // Export to stdout, and to a file that keeps its mode.
        let o = cli(&["--socket", sock, "export", "deny"]).await;
        assert_eq!(stdout(&o), "203.0.113.0/24 # spam run\n2001:db8::/32\n");
        let out = dir.join("exported.list");
        std::fs::write(&out, "old\n").unwrap();
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o640)).unwrap();
        let o = cli(&["--socket", sock, "export", "permit", s(&out)]).await;
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(stdout(&o), "");
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "203.0.113.0/24 # spam run\n2001:db8::/32\n"
        );
        assert_eq!(
            std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        daemon.stop().await;
    });
}

#[test]
fn cli_takes_the_socket_from_the_config_file() {
    bounded(async {
        let daemon = Daemon::start();
        let config = daemon.dir.join("smtpguard.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nhostname = \"mail.example.com\"\n[control]\nsocket = \"{}\"\n",
                daemon.socket.display()
            ),
        )
        .unwrap();
        let o = cli(&["-c", s(&config), "status"]).await;
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(stdout(&o), render::status(&status_view()));
        // --socket wins over the file.
        let o = cli(&[
            "-c",
            s(&config),
            "--socket",
            "/nonexistent/x.sock",
            "status",
        ])
        .await;
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains("/nonexistent/x.sock"), "{}", stderr(&o));
        daemon.stop().await;
    });
}

#[test]
fn cli_errors() {
    bounded(async {
        // A stale socket file: the daemon is not running.
        let dir = TempDir::new("ctl");
        let socket = socket_in(&dir);
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        let o = cli(&["status", "--socket", s(&socket)]).await;
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(stdout(&o), "");
        assert_eq!(
            stderr(&o),
            format!(
                "smtpguard: error: cannot reach the daemon at {}: connection refused (is smtpguard running?)\n",
                socket.display()
            )
        );
        // No socket file at all.
        let o = cli(&["deny", "list", "--socket", "/nonexistent/control.sock"]).await;
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(
            stderr(&o),
            "smtpguard: error: cannot reach the daemon at /nonexistent/control.sock: no such socket (is smtpguard running?)\n"
        );
        // Usage errors are clap's, exit status 2.
        let o = cli(&["frobnicate"]).await;
        assert_eq!(o.status.code(), Some(2));
        assert!(
            stderr(&o).contains("unrecognized subcommand 'frobnicate'"),
            "{}",
            stderr(&o)
        );
        let o = cli(&["mode", "sideways"]).await;
        assert_eq!(o.status.code(), Some(2));
        let o = cli(&["deny", "add", "192.0.2.1", "--for", "soon"]).await;
        assert_eq!(o.status.code(), Some(2));
        assert!(stderr(&o).contains("--for"), "{}", stderr(&o));
        let o = cli(&["check"]).await;
        assert_eq!(o.status.code(), Some(2));
    });
}

/// Runs `stats --watch 1` with `extra` arguments, reads its output until
/// `enough` says so, then interrupts it as Ctrl-C would; returns all of its
/// output and whether it exited successfully.
async fn watch_until(
    socket: &Path,
    extra: &[&str],
    enough: impl Fn(&str) -> bool,
) -> (String, bool) {
    let mut child = tokio::process::Command::new(BIN)
        .args(["--socket", s(socket), "stats", "--watch", "1"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    while !enough(&seen) {
        let line = lines.next_line().await.unwrap().expect("more output");
        seen.push_str(&line);
        seen.push('\n');
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    while let Some(line) = lines.next_line().await.unwrap() {
        seen.push_str(&line);
        seen.push('\n');
    }
    (seen, child.wait().await.unwrap().success())
}

#[test]
fn stats_watch_repeats_until_interrupted() {
    bounded(async {
        let daemon = Daemon::start();
        // JSON: one line of totals per sample.
        let (out, ok) = watch_until(&daemon.socket, &["--json"], |o| o.lines().count() >= 2).await;
        assert!(ok, "Ctrl-C ends the watch normally");
        assert!(out.lines().count() >= 2);
        for line in out.lines() {
            assert_eq!(
                serde_json::from_str::<StatsView>(line).unwrap(),
                stats_view()
            );
        }
        // Text: totals, then rates per second (all zero: the mock's
        // counters do not move), each under a time stamp.
        let (out, ok) = watch_until(&daemon.socket, &[], |o| o.contains("\nlist ")).await;
        assert!(ok, "Ctrl-C ends the watch normally");
        let blocks: Vec<&str> = out.split("\n\n# ").collect();
        assert!(blocks.len() >= 2, "{out}");
        let first = format!(
            "{}\n",
            blocks[0].strip_prefix("# ").expect("a time stamp first")
        );
        assert_eq!(
            first.split_once('\n').unwrap().1,
            render::stats(&stats_view())
        );
        let second = format!("{}\n", blocks[1].trim_end());
        assert_eq!(
            second.split_once('\n').unwrap().1,
            render::stats_rates(&stats_view(), &stats_view(), Duration::from_secs(1))
        );
        assert!(
            second.contains("\nxdp.syn_passed               1234         0.0\n"),
            "{second}"
        );
        daemon.stop().await;
    });
}

// ------------------------------------------------------ the socket itself

#[test]
fn socket_is_0600_in_a_0755_directory() {
    let dir = TempDir::new("ctl");
    let socket = socket_in(&dir);
    let listener = control::bind(&socket).unwrap();
    assert_eq!(listener.path(), socket);
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    let parent = std::fs::metadata(socket.parent().unwrap()).unwrap();
    assert_eq!(parent.permissions().mode() & 0o777, 0o755);
    drop(listener);
    assert!(!socket.exists(), "dropping the listener removes the file");
}

#[test]
fn a_stale_socket_is_replaced() {
    bounded(async {
        let dir = TempDir::new("ctl");
        let socket = socket_in(&dir);
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        // What a crashed daemon leaves: a socket file nobody listens on.
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        assert!(socket.exists());
        let listener = control::bind(&socket).expect("a stale socket is replaced");
        let mock = Arc::new(Mock::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(control::run(listener, mock, shutdown.clone()));
        assert_eq!(
            Client::new(&socket).call(&Request::Status).await.unwrap(),
            Response::Status(status_view())
        );
        shutdown.cancel();
        task.await.unwrap().unwrap();
        assert!(!socket.exists());
    });
}

#[test]
fn a_live_socket_is_an_error() {
    bounded(async {
        let daemon = Daemon::start();
        let err = control::bind(&daemon.socket).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "another smtpguard daemon is running (control socket {} answers)",
                daemon.socket.display()
            )
        );
        // The running daemon is unaffected.
        assert!(daemon.client().call(&Request::Status).await.is_ok());
        daemon.stop().await;
    });
}

#[test]
fn a_file_that_is_not_a_socket_is_left_alone() {
    let dir = TempDir::new("ctl");
    let path = socket_in(&dir);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, "precious").unwrap();
    let err = control::bind(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{} exists and is not a socket; not replacing it with the control socket",
            path.display()
        )
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    let long = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
    assert!(matches!(
        control::bind(&long),
        Err(control::ControlError::PathTooLong { .. })
    ));
}

#[test]
#[ignore = "needs root (runs the CLI as nobody); `cargo xtask test` runs it"]
fn a_non_root_user_cannot_open_the_socket() {
    bounded(async {
        let daemon = Daemon::start();
        let o = cli_as_nobody(&["status", "--socket", s(&daemon.socket)]).await;
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(
            stderr(&o),
            format!(
                "smtpguard: error: cannot reach the daemon at {}: permission denied (the control socket is for root)\n",
                daemon.socket.display()
            )
        );
        assert!(daemon.mock.seen().is_empty());
        daemon.stop().await;
    });
}

#[test]
#[ignore = "needs root (runs the CLI as nobody); `cargo xtask test` runs it"]
fn peer_credentials_are_checked_even_if_the_mode_lets_anyone_connect() {
    bounded(async {
        let daemon = Daemon::start();
        // Test only: open the socket to everyone, so that only the
        // SO_PEERCRED check stands between nobody and the daemon.
        std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        let o = cli_as_nobody(&[
            "deny",
            "add",
            "0.0.0.0/0",
            "--allow-all",
            "--socket",
            s(&daemon.socket),
        ])
        .await;
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(
            stderr(&o),
            "smtpguard: error: permission denied: uid 65534 is not root\n"
        );
        assert!(daemon.mock.seen().is_empty(), "the handler never saw it");
        // Root still gets through.
        assert!(daemon.client().call(&Request::Status).await.is_ok());
        daemon.stop().await;
    });
}

/// Sends raw bytes on a new connection and reads reply lines until EOF.
async fn raw_exchange(socket: &Path, bytes: &[u8]) -> Vec<String> {
    let stream = UnixStream::connect(socket).await.unwrap();
    let (read, mut write) = stream.into_split();
    write.write_all(bytes).await.unwrap();
    // EOF after the request(s): the daemon answers, then closes.
    write.shutdown().await.unwrap();
    let mut lines = BufReader::new(read).lines();
    let mut got = Vec::new();
    while let Ok(Some(line)) = lines.next_line().await {
        got.push(line);
    }
    got
}

#[test]
fn garbage_gets_an_error_reply_and_the_daemon_carries_on() {
    bounded(async {
        let daemon = Daemon::start();
        // Not JSON, then a good request on the same connection.
        let got = raw_exchange(&daemon.socket, b"this is not json\n{\"op\":\"reload\"}\n").await;
        assert_eq!(got.len(), 2, "{got:?}");
        let first: Response = serde_json::from_str(&got[0]).unwrap();
        match first {
            Response::Error(m) => assert!(m.starts_with("malformed request: "), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(got[1].starts_with(r#"{"reloaded":"#), "{}", got[1]);
        // JSON, but no such request.
        let got = raw_exchange(&daemon.socket, b"{\"op\":\"self_destruct\"}\n").await;
        assert!(
            got[0].starts_with(r#"{"error":"malformed request: unknown variant `self_destruct`"#),
            "{got:?}"
        );
        // Not UTF-8: error reply, connection closed.
        let got = raw_exchange(
            &daemon.socket,
            b"\xff\xfe\x00garbage\n{\"op\":\"status\"}\n",
        )
        .await;
        assert_eq!(
            got,
            vec![r#"{"error":"malformed request: not UTF-8"}"#.to_owned()]
        );
        // A handler that panics: error reply, daemon still serving.
        let got = raw_exchange(
            &daemon.socket,
            b"{\"op\":\"list_remove\",\"list\":\"deny\",\"entries\":[\"panic\"]}\n",
        )
        .await;
        assert_eq!(
            got[0],
            r#"{"error":"internal error while handling list_remove (see the daemon's log)"}"#
        );
        // Other clients are unaffected.
        assert_eq!(
            daemon.client().call(&Request::Status).await.unwrap(),
            Response::Status(status_view())
        );
        daemon.stop().await;
    });
}

#[test]
fn an_oversized_request_gets_an_error_reply() {
    bounded(async {
        let daemon = Daemon::start_with(|l| l.set_max_frame_bytes(1024));
        let mut big = vec![b'x'; 4096];
        big.push(b'\n');
        let got = raw_exchange(&daemon.socket, &big).await;
        assert_eq!(
            got,
            vec![r#"{"error":"request too large (the limit is 1024 bytes)"}"#.to_owned()]
        );
        // Without a newline at all, too.
        let got = raw_exchange(&daemon.socket, &[b'{'; 2000]).await;
        assert_eq!(got.len(), 1);
        // The next client is served.
        assert_eq!(
            daemon.client().call(&Request::Reload).await.unwrap(),
            canned(&Request::Reload)
        );
        // A reply over the limit is replaced by an error.
        let request = Request::Import {
            list: ListName::Deny,
            source_name: "x".into(),
            text: "bad\n".repeat(100),
            replace: false,
            dry_run: true,
            skip_invalid: true,
            allow_all: false,
            allow_empty: false,
            source: None,
        };
        match daemon.client().request(&request).await.unwrap() {
            Response::Error(m) => assert!(m.starts_with("reply too large ("), "{m}"),
            other => panic!("{other:?}"),
        }
        daemon.stop().await;
    });
}

#[test]
fn shutdown_closes_idle_connections_and_removes_the_socket() {
    bounded(async {
        let daemon = Daemon::start();
        // A client that connects and says nothing must not hold up shutdown.
        let idle = UnixStream::connect(&daemon.socket).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        let socket = daemon.socket.clone();
        daemon.stop().await;
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(!socket.exists());
        drop(idle);
        match Client::new(&socket).call(&Request::Status).await {
            Err(ClientError::Connect { .. }) => {}
            other => panic!("{other:?}"),
        }
    });
}
