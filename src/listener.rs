//! One bounded accept loop for every TCP listener of the node: SMTP (inbound
//! and outbound), the policy service and the admin listener.
//!
//! A connection is admitted only while fewer than `max_connections` are open
//! and the service's own check ([`Admission`], e.g. a per-block or per-client
//! slot) lets it in; otherwise it gets the service's short refusal line (if
//! any) written without waiting and is closed at once, so that `accept` never
//! stalls behind a full server and a flood costs no task per refused
//! connection. An admitted connection runs in a tracked task and holds a
//! [`Guard`] (its permit and the service's slots) until it ends; [`serve`]
//! returns on shutdown once every connection task has ended.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// How a listener is bounded.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Name in logs and metrics (`smtp`, `outbound`, `policy`, `admin`).
    pub name: &'static str,
    /// Simultaneous connections.
    pub max_connections: usize,
    /// Written to a connection refused because all slots are taken
    /// (`None`: closed without a word).
    pub busy: Option<&'static [u8]>,
}

/// The service's verdict on a new connection, after the total bound.
pub enum Admission<G> {
    /// Run it, holding `G` (e.g. a per-block slot) until it ends.
    Accept(G),
    /// Refuse it: `reason` for logs and metrics, `reply` written first.
    Refuse {
        reason: &'static str,
        reply: Option<&'static [u8]>,
    },
}

/// Held by a connection task for as long as the connection lives: the total
/// permit and whatever the service's admission handed out.
struct Guard<G> {
    _permit: OwnedSemaphorePermit,
    _slots: G,
}

/// Writes `line` if the socket takes it at once, then closes. Never waits:
/// a refusal must not cost a task or hold the accept loop.
fn refuse(stream: TcpStream, line: Option<&[u8]>) {
    if let Some(line) = line {
        let _ = stream.try_write(line);
    }
    drop(stream);
}

/// Accepts on every listener until `shutdown`; each admitted connection runs
/// `handle(stream, peer)` in a tracked task that holds the connection's
/// slots until the handler's future ends. Returns when shutdown was
/// asked and every connection task has ended. An accept loop that panics
/// makes `serve` panic (after the other loops are dropped), so the node sees
/// its listener die.
pub async fn serve<G, A, H, F>(
    listeners: Vec<TcpListener>,
    bounds: Bounds,
    admit: A,
    handle: H,
    shutdown: CancellationToken,
) where
    G: Send + 'static,
    A: Fn(SocketAddr) -> Admission<G> + Send + Sync + 'static,
    H: Fn(TcpStream, SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    // A semaphore cannot hold more than MAX_PERMITS; no host holds that many sockets.
    let permits = Arc::new(Semaphore::new(
        bounds.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let (admit, handle) = (Arc::new(admit), Arc::new(handle));
    let tracker = TaskTracker::new();
    // The accept loops: one that dies must take the whole server (and so the
    // node) down, not leave the other listeners up and this one dead.
    let mut loops = tokio::task::JoinSet::new();
    for listener in listeners {
        let (permits, admit, handle, shutdown, sessions) = (
            permits.clone(),
            admit.clone(),
            handle.clone(),
            shutdown.clone(),
            tracker.clone(),
        );
        loops.spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            warn!(listener = bounds.name, error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    metrics::counter!("magicmx_listener_refusals_total", "listener" => bounds.name, "reason" => "max_connections").increment(1);
                    debug!(listener = bounds.name, %peer, "too many connections");
                    refuse(stream, bounds.busy);
                    continue;
                };
                let slots = match admit(peer) {
                    Admission::Accept(g) => g,
                    Admission::Refuse { reason, reply } => {
                        metrics::counter!("magicmx_listener_refusals_total", "listener" => bounds.name, "reason" => reason).increment(1);
                        debug!(listener = bounds.name, %peer, reason, "connection refused");
                        refuse(stream, reply);
                        continue;
                    }
                };
                let guard = Guard {
                    _permit: permit,
                    _slots: slots,
                };
                let session = handle(stream, peer);
                sessions.spawn(async move {
                    session.await;
                    drop(guard);
                });
            }
        });
    }
    while let Some(r) = loops.join_next().await {
        if let Err(e) = r {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Over the limit a connection is refused at once with the busy line,
    /// while the admitted ones keep running; a slot comes back when one ends.
    #[tokio::test]
    async fn bounded_refuses_over_the_limit_and_frees_slots() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let bounds = Bounds {
            name: "test",
            max_connections: 2,
            busy: Some(b"busy\n"),
        };
        let server = tokio::spawn(serve(
            vec![l],
            bounds,
            |_| Admission::Accept(()),
            |mut s: TcpStream, _| async move {
                let _ = s.write_all(b"hello\n").await;
                let mut b = [0u8; 1];
                let _ = s.read(&mut b).await;
            },
            shutdown.clone(),
        ));
        async fn first(addr: SocketAddr) -> (TcpStream, String) {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut b = [0u8; 16];
            let n = s.read(&mut b).await.unwrap();
            (s, String::from_utf8_lossy(&b[..n]).into_owned())
        }
        let (mut a, t) = first(addr).await;
        assert_eq!(t, "hello\n");
        let (_b, t) = first(addr).await;
        assert_eq!(t, "hello\n");
        let (_c, t) = first(addr).await;
        assert_eq!(t, "busy\n");
        a.write_all(b"x").await.unwrap();
        drop(a);
        let mut freed = false;
        for _ in 0..100 {
            if first(addr).await.1 == "hello\n" {
                freed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(freed, "no slot came back");
        shutdown.cancel();
        drop(_b);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returns after shutdown once connections end")
            .unwrap();
    }
}
