//! A real DNS server for the DNSBL tests and bench: hickory-server on a
//! free loopback UDP port, in the test's own process, serving test zones
//! (`dnsbl.test.`, `dnswl.test.`, ...) and counting the queries each zone
//! receives, so a test can prove that an answer came from smtpguard's
//! cache. Plus [`SilentDns`], a UDP socket that reads and never answers.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Metadata, ResponseCode};
use hickory_server::proto::rr::{rdata::A, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo, Server};
use hickory_server::zone_handler::MessageResponseBuilder;

/// How a zone answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZoneBehaviour {
    /// From its records; NXDOMAIN for names it has not.
    Records,
    /// SERVFAIL to every query.
    ServFail,
}

#[derive(Debug)]
struct Zone {
    behaviour: ZoneBehaviour,
    /// Owner name relative to the zone (`2.0.0.127`) → A records.
    records: HashMap<String, Vec<Ipv4Addr>>,
    ttl: u32,
    queries: AtomicUsize,
}

#[derive(Debug, Default)]
struct Zones {
    zones: Mutex<HashMap<String, Arc<Zone>>>,
}

impl Zones {
    /// The zone holding `name` (lower case, absolute) and the owner
    /// relative to it.
    fn find(&self, name: &str) -> Option<(Arc<Zone>, String)> {
        let name = name.trim_end_matches('.');
        let zones = self.zones.lock().expect("zones lock");
        zones.iter().find_map(|(zone, z)| {
            let owner = if name == zone {
                String::new()
            } else {
                name.strip_suffix(zone.as_str())?
                    .strip_suffix('.')?
                    .to_owned()
            };
            Some((Arc::clone(z), owner))
        })
    }
}

struct Handler {
    zones: Arc<Zones>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let Ok(info) = request.request_info() else {
            let response = builder.error_msg(&request.metadata, ResponseCode::FormErr);
            return send(&mut response_handle, response, &request.metadata).await;
        };
        let qname = info.query.name().to_string().to_ascii_lowercase();
        let qtype = info.query.query_type();
        let Some((zone, owner)) = self.zones.find(&qname) else {
            let response = builder.error_msg(&request.metadata, ResponseCode::Refused);
            return send(&mut response_handle, response, &request.metadata).await;
        };
        zone.queries.fetch_add(1, Ordering::Relaxed);
        if zone.behaviour == ZoneBehaviour::ServFail {
            let response = builder.error_msg(&request.metadata, ResponseCode::ServFail);
            return send(&mut response_handle, response, &request.metadata).await;
        }
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let answers: Vec<Record> = match zone.records.get(&owner) {
            None if !owner.is_empty() => {
                metadata.response_code = ResponseCode::NXDomain;
                Vec::new()
            }
            None => Vec::new(),
            Some(addrs) if qtype == RecordType::A => {
                let owner_name = Name::from_ascii(&qname).expect("query name");
                addrs
                    .iter()
                    .map(|a| Record::from_rdata(owner_name.clone(), zone.ttl, RData::A(A(*a))))
                    .collect()
            }
            Some(_) => Vec::new(),
        };
        let response = builder.build(metadata, answers.iter(), [], [], []);
        send(&mut response_handle, response, &request.metadata).await
    }
}

async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    response: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    request: &Metadata,
) -> ResponseInfo {
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(_) => {
            let mut metadata = Metadata::response_from_request(request);
            metadata.response_code = ResponseCode::ServFail;
            hickory_server::proto::op::Header {
                metadata,
                counts: Default::default(),
            }
            .into()
        }
    }
}

/// A DNS server on `127.0.0.1:<free port>` (UDP), serving the zones
/// added with [`TestDns::zone`]. Stops when dropped.
pub struct TestDns {
    addr: SocketAddr,
    zones: Arc<Zones>,
    task: tokio::task::JoinHandle<()>,
}

impl TestDns {
    /// Starts the server. Must be called within a tokio runtime.
    ///
    /// # Panics
    ///
    /// When no loopback UDP port can be bound.
    pub fn start() -> TestDns {
        let socket = StdUdpSocket::bind("127.0.0.1:0").expect("bind a loopback UDP port");
        socket.set_nonblocking(true).expect("non-blocking");
        let addr = socket.local_addr().expect("local address");
        let socket = tokio::net::UdpSocket::from_std(socket).expect("tokio socket");
        let zones = Arc::new(Zones::default());
        let mut server = Server::new(Handler {
            zones: Arc::clone(&zones),
        });
        server.register_socket(socket);
        let task = tokio::spawn(async move {
            let _ = server.block_until_done().await;
        });
        TestDns { addr, zones, task }
    }

    /// The server's address (`127.0.0.1:PORT`), for `dnsbl.resolver`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `zone` (`dnsbl.test`) with `records`: owner names relative
    /// to the zone (`2.0.0.127`, nibbles for IPv6) and their A records,
    /// answered with `ttl` seconds.
    pub fn zone(&self, zone: &str, ttl: u32, records: &[(&str, &[Ipv4Addr])]) {
        self.add(zone, ZoneBehaviour::Records, ttl, records);
    }

    /// Serves `zone` with SERVFAIL to everything.
    pub fn servfail_zone(&self, zone: &str) {
        self.add(zone, ZoneBehaviour::ServFail, 0, &[]);
    }

    fn add(&self, zone: &str, behaviour: ZoneBehaviour, ttl: u32, records: &[(&str, &[Ipv4Addr])]) {
        let zone_data = Zone {
            behaviour,
            records: records
                .iter()
                .map(|(owner, addrs)| (owner.to_ascii_lowercase(), addrs.to_vec()))
                .collect(),
            ttl,
            queries: AtomicUsize::new(0),
        };
        self.zones.zones.lock().expect("zones lock").insert(
            zone.trim_end_matches('.').to_ascii_lowercase(),
            Arc::new(zone_data),
        );
    }

    /// Queries `zone` has received so far.
    pub fn queries(&self, zone: &str) -> usize {
        self.zones
            .zones
            .lock()
            .expect("zones lock")
            .get(zone.trim_end_matches('.'))
            .map_or(0, |z| z.queries.load(Ordering::Relaxed))
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A UDP socket on `127.0.0.1:<free port>` that reads every query and
/// never answers: a DNS server that has gone silent. Stops when dropped.
pub struct SilentDns {
    addr: SocketAddr,
    received: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SilentDns {
    /// Starts it. Must be called within a tokio runtime.
    ///
    /// # Panics
    ///
    /// When no loopback UDP port can be bound.
    pub fn start() -> SilentDns {
        let socket = StdUdpSocket::bind("127.0.0.1:0").expect("bind a loopback UDP port");
        socket.set_nonblocking(true).expect("non-blocking");
        let addr = socket.local_addr().expect("local address");
        let socket = tokio::net::UdpSocket::from_std(socket).expect("tokio socket");
        let received = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let received = Arc::clone(&received);
            async move {
                let mut buf = [0u8; 1500];
                while socket.recv_from(&mut buf).await.is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        SilentDns {
            addr,
            received,
            task,
        }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams read so far.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for SilentDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}
