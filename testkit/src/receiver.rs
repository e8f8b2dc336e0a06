//! A real HTTP(S) server on loopback that records what the controller sends
//! and can be told to fail, stall or be down (its port closed). Tests wait
//! on what it recorded (a condition, never a sleep).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

/// How the receiver answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// 200 and record.
    Accept,
    /// Answer this status (recorded as refused).
    Fail(u16),
    /// Read the request and never answer.
    Stall,
    /// Record, wait this long, then answer 200 (a slow receiver).
    Slow(Duration),
    /// Answer 503 to every `n`th request (counted from the mode's start),
    /// 200 to the others: a flaky receiver, deterministic.
    FailEvery(u32),
}

/// One request as it arrived.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The status it was answered with (None: stalled).
    pub answered: Option<u16>,
    /// When it was read (for the benchmark's latency).
    pub arrived: std::time::Instant,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        match serde_json::from_slice(&self.body) {
            Ok(value) => value,
            Err(err) => panic!(
                "body is not JSON ({err}): {}",
                String::from_utf8_lossy(&self.body)
            ),
        }
    }

    pub fn delivered(&self) -> bool {
        self.answered
            .is_some_and(|status| (200..300).contains(&status))
    }
}

struct State {
    mode: Mode,
    requests: Vec<Request>,
    /// Requests counted by [`Mode::FailEvery`] since the mode was set.
    counted: u32,
}

pub struct Receiver {
    pub port: u16,
    tls: Option<TlsAcceptor>,
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// A CA and a server certificate for 127.0.0.1 and localhost, made for one
/// test.
pub struct TestCa {
    pub ca_pem: String,
    acceptor: TlsAcceptor,
}

impl TestCa {
    // Not `Default`: each call generates keys, a CA and a certificate.
    #[allow(clippy::new_without_default)]
    pub fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "deploylock test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let leaf_key = KeyPair::generate().expect("server key");
        let leaf_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        let leaf = leaf_params
            .signed_by(&leaf_key, &ca, &ca_key)
            .expect("server certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .expect("TLS config");
        TestCa {
            ca_pem: ca.pem(),
            acceptor: TlsAcceptor::from(Arc::new(config)),
        }
    }
}

impl Receiver {
    /// A plain-HTTP receiver on a free loopback port.
    pub async fn start() -> Receiver {
        Self::start_with(None).await
    }

    /// An HTTPS receiver serving a certificate of `ca`.
    pub async fn start_tls(ca: &TestCa) -> Receiver {
        Self::start_with(Some(ca.acceptor.clone())).await
    }

    async fn start_with(tls: Option<TlsAcceptor>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let port = listener.local_addr().expect("local address").port();
        let receiver = Receiver {
            port,
            tls,
            state: Arc::new(Mutex::new(State {
                mode: Mode::Accept,
                requests: Vec::new(),
                counted: 0,
            })),
            changed: watch::channel(0).0,
            server: Mutex::new(None),
        };
        receiver.serve(listener);
        receiver
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{path}", self.port)
    }

    fn serve(&self, listener: TcpListener) {
        let state = self.state.clone();
        let changed = self.changed.clone();
        let tls = self.tls.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (state, changed, tls) = (state.clone(), changed.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                handle(stream, state, changed).await;
                            }
                        }
                        None => handle(stream, state, changed).await,
                    }
                });
            }
        });
        *self.server.lock().unwrap() = Some(task);
    }

    pub fn set_mode(&self, mode: Mode) {
        let mut state = self.state.lock().unwrap();
        state.mode = mode;
        state.counted = 0;
    }

    /// Closes the port: connections are refused until [`Receiver::up`].
    pub fn down(&self) {
        if let Some(task) = self.server.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn up(&self) {
        let listener = loop {
            // The aborted task drops its listener asynchronously.
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(listener) => break listener,
                Err(_) => tokio::task::yield_now().await,
            }
        };
        self.serve(listener);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn delivered(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(Request::delivered)
            .collect()
    }

    /// Waits until `done` holds for the requests recorded so far; panics
    /// with `what` and everything recorded after `timeout`.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Request]) -> bool,
    ) -> Vec<Request> {
        match self.wait_until(timeout, done).await {
            Ok(requests) => requests,
            Err(requests) => panic!(
                "receiver: {what} not seen within {timeout:?}; recorded: {:#?}",
                requests
                    .iter()
                    .map(|r| (r.answered, r.header("idempotency-key").map(str::to_string)))
                    .collect::<Vec<_>>()
            ),
        }
    }

    /// Waits until `done` holds for the requests recorded so far: `Ok` with
    /// them, or `Err` with everything recorded when `timeout` ran out.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&[Request]) -> bool,
    ) -> Result<Vec<Request>, Vec<Request>> {
        let mut changes = self.changed.subscribe();
        let waited = tokio::time::timeout(timeout, async {
            loop {
                let requests = self.requests();
                if done(&requests) {
                    return requests;
                }
                let _ = changes.changed().await;
            }
        })
        .await;
        waited.map_err(|_| self.requests())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.down();
    }
}

/// Reads one HTTP/1.1 request (headers, Content-Length body), answers it by
/// the mode, records it and closes the connection.
async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_string();
    let path = request_line.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0);
    let mut body = buffer[head_end + 4..].to_vec();
    while body.len() < length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let mode = state.lock().unwrap().mode;
    let answered = match mode {
        Mode::Accept | Mode::Slow(_) => Some(200),
        Mode::Fail(status) => Some(status),
        Mode::Stall => None,
        Mode::FailEvery(n) => {
            let mut state = state.lock().unwrap();
            state.counted = state.counted.wrapping_add(1);
            Some(if n > 0 && state.counted % n == 0 {
                503
            } else {
                200
            })
        }
    };
    state.lock().unwrap().requests.push(Request {
        method,
        path,
        headers,
        body,
        answered,
        arrived: std::time::Instant::now(),
    });
    match answered {
        Some(status) => {
            if let Mode::Slow(delay) = mode {
                changed.send_modify(|n| *n += 1);
                tokio::time::sleep(delay).await;
            }
            let text = if status == 200 { "ok" } else { "refused" };
            let response = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
            changed.send_modify(|n| *n += 1);
        }
        None => {
            changed.send_modify(|n| *n += 1);
            // Held open: the client's own timeout ends it.
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }
}
