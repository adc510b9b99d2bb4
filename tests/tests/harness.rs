//! The harness itself: nodes really are isolated (own /nix, own network), so the fleet tests
//! built on it prove what they claim.

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use roost_tests::{Bridge, Node, preflight, require};

#[test]
fn a_node_has_its_own_empty_nix_and_a_cuttable_link() {
    require!(preflight());
    let tmp = tempfile::tempdir().unwrap();
    let bridge = Bridge::create().unwrap();
    let node = Node::create(tmp.path(), "probe", &bridge).unwrap();
    // The node sees its own /nix: a marker written there is visible from the host side only
    // under the node's folder, and the host's store is not visible inside.
    let out = node
        .command(
            Path::new("/bin/sh"),
            &["-c".into(), "touch /nix/marker && ls -A /nix".into()],
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "marker");
    assert!(node.nix_dir().join("marker").exists());
    assert!(!Path::new("/nix/marker").exists());

    // The node reaches a host listener over its veth link, and not once the link is cut.
    let listener = TcpListener::bind((node.host_ip, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let reachable = |n: &Node| {
        n.command(
            Path::new("/usr/bin/timeout"),
            &[
                "3".into(),
                "bash".into(),
                "-c".into(),
                format!("exec 3<>/dev/tcp/{}/{port}", n.host_ip),
            ],
        )
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    };
    assert!(
        reachable(&node),
        "the node cannot reach the host over its link"
    );
    node.set_link(false).unwrap();
    assert!(
        !reachable(&node),
        "the host is still reachable with the link down"
    );
    node.set_link(true).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(reachable(&node), "the link did not come back");
    drop(listener);
}
