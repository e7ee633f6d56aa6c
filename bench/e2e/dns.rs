//! The test domain's DNS, served from inside the harness (hickory-server,
//! adapted from tests/common/dns.rs): one authoritative in-memory `test.`
//! zone on 127.0.0.1, UDP and TCP on the same free port, on its own thread.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use hickory_server::proto::rr::rdata::{A, MX, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use hickory_server::Server;

fn fqdn(name: &str) -> Name {
    Name::from_ascii(format!("{}.", name.trim_end_matches('.'))).expect("DNS name")
}

/// `domain MX 10 mx.domain`, `mx.domain A 127.0.0.1`, for every domain
/// (all under `.test`).
fn catalog(domains: &[&str]) -> Catalog {
    let origin = fqdn("test");
    let mut zone: InMemoryZoneHandler =
        InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    let soa = SOA::new(
        fqdn("ns.test"),
        fqdn("hostmaster.test"),
        1,
        3600,
        600,
        86400,
        5,
    );
    assert!(zone.upsert_mut(Record::from_rdata(origin.clone(), 300, RData::SOA(soa)), 1));
    for d in domains {
        let mx = format!("mx.{d}");
        zone.upsert_mut(
            Record::from_rdata(fqdn(d), 300, RData::MX(MX::new(10, fqdn(&mx)))),
            1,
        );
        zone.upsert_mut(
            Record::from_rdata(fqdn(&mx), 300, RData::A(A(Ipv4Addr::LOCALHOST))),
            1,
        );
    }
    let mut catalog = Catalog::new();
    let handler: Arc<dyn ZoneHandler> = Arc::new(zone);
    catalog.upsert(LowerName::new(&origin), vec![handler]);
    catalog
}

pub struct DnsServer {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl DnsServer {
    pub fn start(domains: &[&str]) -> DnsServer {
        let domains: Vec<String> = domains.iter().map(|s| s.to_string()).collect();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name("bench-dns".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("DNS runtime");
                rt.block_on(async move {
                    let names: Vec<&str> = domains.iter().map(|s| s.as_str()).collect();
                    let mut server = Server::new(catalog(&names));
                    let mut bound = None;
                    for _ in 0..50 {
                        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
                            .await
                            .expect("bind DNS UDP");
                        let addr = udp.local_addr().expect("UDP addr");
                        if let Ok(tcp) = tokio::net::TcpListener::bind(addr).await {
                            bound = Some((udp, tcp, addr));
                            break;
                        }
                    }
                    let (udp, tcp, addr) = bound.expect("no port free for both UDP and TCP");
                    server.register_socket(udp);
                    server.register_listener(tcp, Duration::from_secs(5), 64 * 1024);
                    ready_tx.send(addr).expect("report DNS address");
                    let _ = shutdown_rx.await;
                    let _ = server.shutdown_gracefully().await;
                });
            })
            .expect("spawn DNS thread");
        let addr = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("DNS server did not start");
        DnsServer {
            addr,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
