//! The VM tests' helper, one binary for both ends of QEMU's user network:
//! - `serve PORT`, in the guest: each connection sends a shell script and closes its write
//!   side; the script runs under `/bin/sh -c` and the answer is its output (stdout and stderr
//!   together, as it is written), then a last line `roost-vm-exit:CODE`. The host reaches it through a hostfwd.
//! - `relay HOST:PORT`, on the host: QEMU's `guestfwd=…-cmd:` starts it for each connection
//!   the guest opens to the coordinator's forwarded address, with that connection on stdin and
//!   stdout; it copies both ways to the real coordinator. (A `guestfwd` to a chardev would
//!   carry one connection only.)

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, ExitCode, Stdio};

/// The last line of every answer: the script's exit code (-1 when a signal ended it).
const EXIT_MARK: &str = "roost-vm-exit:";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["serve", port] => serve(port),
        ["relay", addr] => relay(addr),
        _ => {
            eprintln!("usage: roost-vm-helper serve PORT | relay HOST:PORT");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("roost-vm-helper: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(port: &str) -> std::io::Result<()> {
    let listener = TcpListener::bind(format!("0.0.0.0:{port}"))?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        // One thread per request: a test may wait on one script while it runs another.
        std::thread::spawn(move || {
            if let Err(e) = answer(conn) {
                eprintln!("roost-vm-helper: a request failed: {e}");
            }
        });
    }
    Ok(())
}

fn answer(mut conn: TcpStream) -> std::io::Result<()> {
    let mut script = String::new();
    conn.read_to_string(&mut script)?;
    // The output goes straight to the connection as it is written, so the host can react to
    // a line while the script still runs (the power-cut test does).
    let out = std::os::fd::OwnedFd::from(conn.try_clone()?);
    let status = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("exec 2>&1\n{script}"))
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .status()?;
    let code = status.code().unwrap_or(-1);
    conn.write_all(format!("\n{EXIT_MARK}{code}\n").as_bytes())?;
    conn.shutdown(Shutdown::Write)
}

fn relay(addr: &str) -> std::io::Result<()> {
    let upstream = TcpStream::connect(addr)?;
    let mut up_read = upstream.try_clone()?;
    let up_write = upstream;
    // Guest → coordinator on a thread; coordinator → guest here. Each direction's end is
    // passed on as a half-close, so HTTP's framing is untouched.
    let to_upstream = std::thread::spawn(move || {
        let mut up_write = up_write;
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut up_write);
        let _ = up_write.shutdown(Shutdown::Write);
    });
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = up_read.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stdout.write_all(&buf[..n])?;
        stdout.flush()?;
    }
    drop(stdout);
    // The coordinator closed: nothing more can be answered, so the relay ends (and with it
    // the guest's connection) without waiting for the guest's side.
    drop(to_upstream);
    Ok(())
}
