//! A fault-injecting proxy (exec's partition tests, the torture run).

use std::path::{Path, PathBuf};

/// What the fault-injecting proxy does to traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forwards every byte.
    None,
    /// Stops forwarding on open connections (without closing them) and
    /// accepts new ones without ever answering (a TLS handshake hangs).
    Freeze,
    /// Resets open connections (RST) and accepts new ones without ever
    /// answering: the reconnect hangs in its TLS handshake.
    ResetThenStall,
    /// Swallows what clients send on open and new connections, answers
    /// nothing.
    BlackHole,
}

/// A loopback TCP proxy in front of the real API server, to inject network
/// faults at chosen moments. It is not an API server: it only forwards,
/// stalls, drops or resets bytes.
pub struct FaultProxy {
    mode: tokio::sync::watch::Sender<Fault>,
    kubeconfig: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy in front of the server of `kubeconfig`, and a copy of that
    /// kubeconfig (in `dir`) pointing at the proxy. The server's certificate
    /// names 127.0.0.1, so TLS goes through unchanged.
    pub async fn start(kubeconfig: &Path, dir: &Path) -> FaultProxy {
        let text = std::fs::read_to_string(kubeconfig)
            .unwrap_or_else(|err| panic!("cannot read {}: {err}", kubeconfig.display()));
        let server = text
            .lines()
            .find_map(|line| line.trim().strip_prefix("server: https://"))
            .unwrap_or_else(|| panic!("no server in {}", kubeconfig.display()))
            .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|err| panic!("cannot listen: {err}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|err| panic!("no address: {err}"))
            .port();
        let path = dir.join("proxied.kubeconfig");
        let rewritten = text.replace(&server, &format!("127.0.0.1:{port}"));
        std::fs::write(&path, rewritten)
            .unwrap_or_else(|err| panic!("cannot write {}: {err}", path.display()));
        let (mode, modes) = tokio::sync::watch::channel(Fault::None);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let modes = modes.clone();
                let upstream = server.clone();
                connections.spawn(async move {
                    let fault = *modes.borrow();
                    if fault != Fault::None {
                        stall(client).await;
                        return;
                    }
                    if let Ok(upstream) = tokio::net::TcpStream::connect(&upstream).await {
                        forward(client, upstream, modes).await;
                    }
                });
            }
        });
        FaultProxy {
            mode,
            kubeconfig: path,
            task,
        }
    }

    pub fn set(&self, fault: Fault) {
        self.mode.send_replace(fault);
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts what a client sends and never answers.
async fn stall(mut client: tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut buffer = [0u8; 16384];
    while matches!(client.read(&mut buffer).await, Ok(n) if n > 0) {}
}

/// Forwards bytes both ways while the mode allows it.
async fn forward(
    mut client: tokio::net::TcpStream,
    mut upstream: tokio::net::TcpStream,
    mut modes: tokio::sync::watch::Receiver<Fault>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut up = [0u8; 16384];
    let mut down = [0u8; 16384];
    loop {
        let fault = *modes.borrow_and_update();
        match fault {
            Fault::None => {
                tokio::select! {
                    read = client.read(&mut up) => match read {
                        Ok(n) if n > 0 => if upstream.write_all(&up[..n]).await.is_err() { return },
                        _ => return,
                    },
                    read = upstream.read(&mut down) => match read {
                        Ok(n) if n > 0 => if client.write_all(&down[..n]).await.is_err() { return },
                        _ => return,
                    },
                    changed = modes.changed() => if changed.is_err() { return },
                }
            }
            Fault::Freeze => {
                if modes.changed().await.is_err() {
                    return;
                }
            }
            Fault::BlackHole => {
                tokio::select! {
                    read = client.read(&mut up) => if !matches!(read, Ok(n) if n > 0) { return },
                    changed = modes.changed() => if changed.is_err() { return },
                }
            }
            Fault::ResetThenStall => {
                // SO_LINGER 0: the close sends RST, not FIN.
                let _ = client.set_zero_linger();
                return;
            }
        }
    }
}
