//! Which families each SMTP listener serves (`front_door::bind`), in a
//! namespace of the test's own so the wildcard addresses reach nothing but
//! its loopback: `[::]:P` alone is dual-stack, and beside an IPv4 listener
//! on the same port it is IPv6-only (both bind).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use smtpguard::front_door;
use smtpguard_tests::netns::{unique_tag, Netns};
use smtpguard_tests::require_root;
use tokio::net::{TcpListener, TcpStream};

const PORT: u16 = 2525;

/// Binds `listen` in a fresh namespace, connects once to `target`, and
/// returns the index of the listener that accepted it and the peer address
/// it saw; `None` when the connection was refused.
fn who_accepts(listen: &[&str], target: &str) -> Option<(usize, IpAddr)> {
    let listen: Vec<SocketAddr> = listen.iter().map(|a| a.parse().unwrap()).collect();
    let target: SocketAddr = target.parse().unwrap();
    let ns = Netns::new("lsn", &unique_tag());
    ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listeners = front_door::bind(&listen).expect("every listener binds");
            let client = TcpStream::connect(target).await.ok()?;
            let accepted = tokio::time::timeout(Duration::from_secs(5), first_accept(listeners))
                .await
                .expect("the connection reached a listener");
            drop(client);
            Some(accepted)
        })
    })
}

/// The first connection any of `listeners` accepts: its index and peer.
async fn first_accept(listeners: Vec<TcpListener>) -> (usize, IpAddr) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (i, listener) in listeners.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Ok((_, peer)) = listener.accept().await {
                let _ = tx.send((i, peer.ip()));
            }
        });
    }
    rx.recv().await.expect("an accept task reports")
}

#[test]
fn ipv6_wildcard_alone_serves_ipv4_too() {
    require_root();
    let listen = [&*format!("[::]:{PORT}")];
    let v4 = who_accepts(&listen, &format!("127.0.0.1:{PORT}"));
    assert_eq!(
        v4,
        Some((0, "::ffff:127.0.0.1".parse().unwrap())),
        "an IPv4 client reaches the lone [::] listener, as a mapped address"
    );
    let v6 = who_accepts(&listen, &format!("[::1]:{PORT}"));
    assert_eq!(v6, Some((0, "::1".parse().unwrap())));
}

#[test]
fn ipv6_wildcard_beside_ipv4_wildcard_is_ipv6_only() {
    require_root();
    let listen = [&*format!("0.0.0.0:{PORT}"), &*format!("[::]:{PORT}")];
    let v4 = who_accepts(&listen, &format!("127.0.0.1:{PORT}"));
    assert_eq!(v4, Some((0, "127.0.0.1".parse().unwrap())));
    let v6 = who_accepts(&listen, &format!("[::1]:{PORT}"));
    assert_eq!(v6, Some((1, "::1".parse().unwrap())));
}

#[test]
fn ipv6_wildcard_beside_a_specific_ipv4_address_still_binds() {
    require_root();
    // Dual-stack here would collide with 127.0.0.1:P ("address in use").
    let listen = [&*format!("127.0.0.1:{PORT}"), &*format!("[::]:{PORT}")];
    let v4 = who_accepts(&listen, &format!("127.0.0.1:{PORT}"));
    assert_eq!(v4, Some((0, "127.0.0.1".parse().unwrap())));
}

#[test]
fn ipv6_wildcard_on_another_port_stays_dual_stack() {
    require_root();
    let other = PORT + 1;
    let listen = [&*format!("0.0.0.0:{PORT}"), &*format!("[::]:{other}")];
    let v4 = who_accepts(&listen, &format!("127.0.0.1:{other}"));
    assert_eq!(v4, Some((1, "::ffff:127.0.0.1".parse().unwrap())));
}
