//! A real DNS server inside the process (hickory-server), for
//! `magicmx demo` and the tests: one
//! authoritative in-memory zone per top-level label of the names given
//! (normally a single `test.` zone), served over UDP and TCP on
//! 127.0.0.1 with the same port. It runs on its own thread and runtime, so
//! it serves sync and async callers alike. Unknown names inside a zone get
//! NXDOMAIN, known names without the asked type get NODATA (NOERROR, empty).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use hickory_server::proto::rr::rdata::{A, AAAA, MX, SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use hickory_server::Server;

/// One resource record for the zones. Names are written without the
/// trailing dot.
#[derive(Clone, Debug)]
pub enum Rec {
    /// `name MX preference exchange`
    Mx(&'static str, u16, &'static str),
    /// RFC 7505 null MX: `name MX 0 .`
    NullMx(&'static str),
    A(&'static str, &'static str),
    Aaaa(&'static str, &'static str),
    Txt(&'static str, &'static str),
    /// A TXT record of several character-strings (each at most 255
    /// octets), e.g. a DKIM RSA key.
    TxtStrings(&'static str, Vec<String>),
}

const TTL: u32 = 60;

fn fqdn(name: &str) -> Name {
    let name = if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    };
    Name::from_ascii(&name).unwrap_or_else(|e| panic!("bad DNS name {name:?}: {e}"))
}

impl Rec {
    fn owner(&self) -> &'static str {
        match self {
            Rec::Mx(n, ..)
            | Rec::NullMx(n)
            | Rec::A(n, _)
            | Rec::Aaaa(n, _)
            | Rec::Txt(n, _)
            | Rec::TxtStrings(n, _) => n,
        }
    }

    fn record(&self) -> Record {
        let data = match self {
            Rec::Mx(_, pref, exchange) => RData::MX(MX::new(*pref, fqdn(exchange))),
            Rec::NullMx(_) => RData::MX(MX::new(0, Name::root())),
            Rec::A(_, ip) => RData::A(A(ip.parse::<Ipv4Addr>().expect("IPv4 address"))),
            Rec::Aaaa(_, ip) => RData::AAAA(AAAA(ip.parse::<Ipv6Addr>().expect("IPv6 address"))),
            Rec::Txt(_, text) => RData::TXT(TXT::new(vec![text.to_string()])),
            Rec::TxtStrings(_, strings) => RData::TXT(TXT::new(strings.clone())),
        };
        Record::from_rdata(fqdn(self.owner()), TTL, data)
    }
}

/// The zone a name belongs to: its last label (`a.b.test` → `test.`).
fn zone_of(name: &str) -> String {
    let name = name.trim_end_matches('.');
    let tld = name.rsplit('.').next().unwrap_or(name);
    format!("{tld}.")
}

fn build_catalog(records: &[Rec]) -> Catalog {
    let mut zones: BTreeMap<String, Vec<&Rec>> = BTreeMap::new();
    for r in records {
        zones.entry(zone_of(r.owner())).or_default().push(r);
    }
    let mut catalog = Catalog::new();
    for (origin, recs) in zones {
        let origin = fqdn(&origin);
        let mut zone: InMemoryZoneHandler =
            InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let soa = SOA::new(
            fqdn(&format!("ns.{origin}")),
            fqdn(&format!("hostmaster.{origin}")),
            1,
            3600,
            600,
            86400,
            // Negative answers are cached for this long at most.
            5,
        );
        assert!(zone.upsert_mut(Record::from_rdata(origin.clone(), TTL, RData::SOA(soa)), 1));
        for r in recs {
            assert!(zone.upsert_mut(r.record(), 1), "cannot add {r:?}");
        }
        let handler: Arc<dyn ZoneHandler> = Arc::new(zone);
        catalog.upsert(LowerName::new(&origin), vec![handler]);
    }
    catalog
}

pub struct DnsServer {
    /// UDP and TCP, same port.
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl DnsServer {
    pub fn start(records: &[Rec]) -> DnsServer {
        let records = records.to_vec();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name("demo-dns".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("DNS runtime");
                rt.block_on(async move {
                    let mut server = Server::new(build_catalog(&records));
                    // Bind UDP on a free port, then TCP on the same port.
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
