//! The gateway's uplink as a TCP proxy in front of the broker, so tests cut the link the way the
//! field does instead of stopping the broker: `pass` forwards bytes, `refuse` closes every
//! connection and refuses new ones (the broker is unreachable), `blackhole` accepts and holds
//! connections but forwards nothing (a 4G link that dies silently; only keepalive notices).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Refuse,
    Blackhole,
}

/// A running proxy; dropped, it stops (its thread's runtime ends with the control channel).
pub struct LinkProxy {
    pub port: u16,
    mode: watch::Sender<Mode>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LinkProxy {
    /// Listens on `port` (a free loopback port) and forwards to `upstream`.
    pub fn start(port: u16, upstream: SocketAddr) -> LinkProxy {
        let (tx, rx) = watch::channel(Mode::Pass);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("link-proxy-{port}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(serve(port, upstream, rx, ready_tx));
            })
            .unwrap();
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("link proxy listening");
        LinkProxy {
            port,
            mode: tx,
            thread: Some(thread),
        }
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
        // Wait (bounded) until the listener reflects the mode: refused connections are refused.
        let deadline = meterd::clock::Clock::system().instant() + Duration::from_secs(5);
        loop {
            let accepting = std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
            if accepting == (mode != Mode::Refuse) {
                return;
            }
            assert!(
                meterd::clock::Clock::system().instant() < deadline,
                "link proxy did not switch to {mode:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        // Closing the channel ends `serve`.
        let (tx, _) = watch::channel(Mode::Refuse);
        drop(std::mem::replace(&mut self.mode, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn bind(port: u16) -> TcpListener {
    // The port was ours a moment ago; a refused period closes and re-binds it.
    for _ in 0..200 {
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("link proxy could not bind 127.0.0.1:{port}");
}

async fn serve(
    port: u16,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    ready: std::sync::mpsc::Sender<()>,
) {
    let mut listener = Some(bind(port).await);
    let _ = ready.send(());
    loop {
        let current = *mode.borrow_and_update();
        match (&listener, current) {
            (None, Mode::Pass | Mode::Blackhole) => listener = Some(bind(port).await),
            (Some(_), Mode::Refuse) => listener = None,
            _ => {}
        }
        match &listener {
            Some(l) => tokio::select! {
                accepted = l.accept() => {
                    if let Ok((client, _)) = accepted {
                        tokio::spawn(connection(client, upstream, mode.clone()));
                    }
                }
                changed = mode.changed() => if changed.is_err() { return },
            },
            None => {
                if mode.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One client connection: forwarded while the link passes; closed when it is refused; held
/// without forwarding while it is a black hole (then closed when the mode changes again).
async fn connection(mut client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<Mode>) {
    let at_start = *mode.borrow_and_update();
    if at_start == Mode::Blackhole {
        let _ = mode.changed().await;
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        () = async {
            loop {
                if mode.changed().await.is_err() || *mode.borrow() != Mode::Pass {
                    return;
                }
            }
        } => {
            if *mode.borrow() == Mode::Blackhole {
                // Hold both ends silent until the link changes again.
                let _ = mode.changed().await;
            }
        }
    }
    let _ = client.shutdown().await;
}
