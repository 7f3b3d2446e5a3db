//! An authoritative DNS server on 127.0.0.1 for tests: real DNS messages
//! over UDP (encoded and decoded by hickory-proto), answering from a table
//! the test fills in. Names with no records get NXDOMAIN; names listed as
//! failing get SERVFAIL. Counts queries, so caching can be observed.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA, MX, PTR, TXT};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};

#[derive(Default)]
struct Zone {
    records: HashMap<(String, RecordType), Vec<RData>>,
    failing: HashSet<String>,
    silent: HashSet<String>,
    queries: HashMap<String, usize>,
}

pub struct TestDns {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl TestDns {
    pub fn start() -> TestDns {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(Zone::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let zone = Arc::clone(&zone);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || serve(socket, zone, stop))
        };
        TestDns {
            addr,
            zone,
            stop,
            thread: Some(thread),
        }
    }

    fn add(&self, name: &str, record_type: RecordType, data: RData) {
        self.zone
            .lock()
            .unwrap()
            .records
            .entry((key(name), record_type))
            .or_default()
            .push(data);
    }

    pub fn mx(&self, domain: &str, preference: u16, host: &str) -> &Self {
        let exchange = if host == "." {
            Name::root()
        } else {
            Name::from_str(&format!("{host}.")).unwrap()
        };
        self.add(
            domain,
            RecordType::MX,
            RData::MX(MX::new(preference, exchange)),
        );
        self
    }

    /// RFC 7505: one MX of preference 0 pointing at the root.
    pub fn null_mx(&self, domain: &str) -> &Self {
        self.mx(domain, 0, ".")
    }

    pub fn a(&self, host: &str, ip: &str) -> &Self {
        match ip.parse::<IpAddr>().unwrap() {
            IpAddr::V4(v4) => self.add(host, RecordType::A, RData::A(A(v4))),
            IpAddr::V6(v6) => self.add(host, RecordType::AAAA, RData::AAAA(AAAA(v6))),
        }
        self
    }

    /// A TXT record of one or more character strings.
    #[allow(dead_code)] // not every test binary publishes TXT records
    pub fn txt(&self, name: &str, strings: &[String]) -> &Self {
        self.add(
            name,
            RecordType::TXT,
            RData::TXT(TXT::new(strings.to_vec())),
        );
        self
    }

    /// Reverse DNS: the PTR record of an address.
    #[allow(dead_code)] // not every test binary publishes PTR records
    pub fn ptr(&self, ip: &str, host: &str) -> &Self {
        let arpa = Name::from(ip.parse::<IpAddr>().unwrap()).to_string();
        let target = Name::from_str(&format!("{host}.")).unwrap();
        self.add(&arpa, RecordType::PTR, RData::PTR(PTR(target)));
        self
    }

    /// Queries for this name get SERVFAIL.
    pub fn fail(&self, name: &str) -> &Self {
        self.zone.lock().unwrap().failing.insert(key(name));
        self
    }

    /// Queries for this name get no answer at all (the resolver times out).
    #[allow(dead_code)] // only some test binaries need a dead name server
    pub fn silent(&self, name: &str) -> &Self {
        self.zone.lock().unwrap().silent.insert(key(name));
        self
    }

    /// How many queries (any type) asked for this name.
    pub fn queries_for(&self, name: &str) -> usize {
        self.zone
            .lock()
            .unwrap()
            .queries
            .get(&key(name))
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(socket: UdpSocket, zone: Arc<Mutex<Zone>>, stop: Arc<AtomicBool>) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        let (len, peer) = match socket.recv_from(&mut buf) {
            Ok(received) => received,
            Err(_) => continue,
        };
        let Ok(request) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        let mut response = Message::new(
            request.metadata.id,
            MessageType::Response,
            request.metadata.op_code,
        );
        response.metadata.authoritative = true;
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.queries = request.queries.clone();
        if let Some(query) = request.queries.first() {
            let name = key(&query.name.to_ascii());
            let mut zone = zone.lock().unwrap();
            *zone.queries.entry(name.clone()).or_default() += 1;
            if zone.silent.contains(&name) {
                continue;
            }
            if zone.failing.contains(&name) {
                response.metadata.response_code = ResponseCode::ServFail;
            } else if let Some(answers) = zone.records.get(&(name.clone(), query.query_type)) {
                for data in answers {
                    response
                        .answers
                        .push(Record::from_rdata(query.name.clone(), 60, data.clone()));
                }
            } else if !zone.records.keys().any(|(n, _)| *n == name) {
                response.metadata.response_code = ResponseCode::NXDomain;
            }
        }
        if let Ok(bytes) = response.to_vec() {
            let _ = socket.send_to(&bytes, peer);
        }
    }
}
