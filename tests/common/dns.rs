//! A test DNS server on loopback: UDP and TCP on one port of 127.0.0.1,
//! answering like a recursive resolver from a small [`Zone`] the test can
//! change while the server runs.
//!
//! ```ignore
//! let mut zone = Zone::new();
//! zone.mx("example.test", 10, "mx1.example.test")
//!     .a("mx1.example.test", "127.0.0.2")
//!     .servfail("broken.test");
//! let dns = TestDns::start(zone);
//! // [dns] nameservers = [dns.addr()]
//! dns.update(|z| { z.remove("example.test"); });
//! assert_eq!(dns.queries_for("example.test", "MX"), 1);
//! ```
//!
//! Semantics: a name exists when it owns a record or is an ancestor of a
//! name that does (so `test` exists when `example.test` does). CNAMEs are
//! followed inside the zone (up to 8) and the chain is put in the answer, as
//! a recursive resolver would. Missing types get NOERROR with an SOA in the
//! authority section (negative TTL = [`Zone::negative_ttl`]); missing names
//! get NXDOMAIN with the SOA. Per-name behaviours override all that:
//! SERVFAIL, REFUSED, NXDOMAIN, no answer at all (timeout), or a truncated
//! UDP answer (so the client must retry over TCP).
//!
//! The server runs in threads owned by the [`TestDns`] guard; dropping it
//! stops them and closes every connection.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use hickory_resolver::proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA, CNAME, MX, SOA, TXT};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};

/// One record's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rec {
    /// MX preference and exchange (`"."` for a null MX).
    Mx(u16, String),
    /// An IPv4 address.
    A(Ipv4Addr),
    /// An IPv6 address.
    Aaaa(Ipv6Addr),
    /// An alias.
    Cname(String),
    /// A text record.
    Txt(String),
}

impl Rec {
    fn record_type(&self) -> RecordType {
        match self {
            Rec::Mx(..) => RecordType::MX,
            Rec::A(_) => RecordType::A,
            Rec::Aaaa(_) => RecordType::AAAA,
            Rec::Cname(_) => RecordType::CNAME,
            Rec::Txt(_) => RecordType::TXT,
        }
    }

    fn rdata(&self) -> RData {
        match self {
            Rec::Mx(pref, exchange) => RData::MX(MX::new(*pref, name(exchange))),
            Rec::A(a) => RData::A(A(*a)),
            Rec::Aaaa(a) => RData::AAAA(AAAA(*a)),
            Rec::Cname(target) => RData::CNAME(CNAME(name(target))),
            Rec::Txt(text) => RData::TXT(TXT::new(vec![text.clone()])),
        }
    }
}

/// What the server does for a name instead of answering from the records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Answer SERVFAIL.
    ServFail,
    /// Answer REFUSED.
    Refused,
    /// Answer NXDOMAIN even if records exist.
    NxDomain,
    /// Never answer (the client times out).
    Timeout,
    /// Over UDP answer with TC=1 and no records; TCP answers normally.
    TruncateUdp,
}

/// Records and behaviours, keyed by lowercase names without trailing dot.
#[derive(Clone, Debug)]
pub struct Zone {
    records: Vec<(String, u32, Rec)>,
    behaviours: HashMap<(String, Option<RecordType>), Behaviour>,
    /// TTL given to records added from now on.
    pub ttl: u32,
    /// TTL (and SOA minimum) of negative answers.
    pub negative_ttl: u32,
}

impl Default for Zone {
    fn default() -> Self {
        Zone::new()
    }
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn name(text: &str) -> Name {
    if text == "." || text.is_empty() {
        return Name::root();
    }
    let mut n = Name::from_ascii(text.trim_end_matches('.')).expect("test zone name");
    n.set_fqdn(true);
    n
}

impl Zone {
    /// An empty zone: records get TTL 300, negative answers 300.
    pub fn new() -> Zone {
        Zone {
            records: Vec::new(),
            behaviours: HashMap::new(),
            ttl: 300,
            negative_ttl: 300,
        }
    }

    /// Sets the TTL of records added after this call.
    pub fn ttl(&mut self, ttl: u32) -> &mut Self {
        self.ttl = ttl;
        self
    }

    /// Sets the negative TTL (SOA TTL and minimum).
    pub fn negative_ttl(&mut self, ttl: u32) -> &mut Self {
        self.negative_ttl = ttl;
        self
    }

    /// Adds a record with the current TTL.
    pub fn add(&mut self, name: &str, rec: Rec) -> &mut Self {
        let ttl = self.ttl;
        self.records.push((key(name), ttl, rec));
        self
    }

    /// Adds an MX record.
    pub fn mx(&mut self, name: &str, preference: u16, exchange: &str) -> &mut Self {
        self.add(name, Rec::Mx(preference, key(exchange)))
    }

    /// Adds the RFC 7505 null MX (`0 .`).
    pub fn null_mx(&mut self, name: &str) -> &mut Self {
        self.add(name, Rec::Mx(0, ".".into()))
    }

    /// Adds an A record (`ip` in dotted form).
    pub fn a(&mut self, name: &str, ip: &str) -> &mut Self {
        self.add(name, Rec::A(ip.parse().expect("IPv4 address")))
    }

    /// Adds an AAAA record.
    pub fn aaaa(&mut self, name: &str, ip: &str) -> &mut Self {
        self.add(name, Rec::Aaaa(ip.parse().expect("IPv6 address")))
    }

    /// Adds a CNAME.
    pub fn cname(&mut self, name: &str, target: &str) -> &mut Self {
        self.add(name, Rec::Cname(key(target)))
    }

    /// Adds a TXT record.
    pub fn txt(&mut self, name: &str, text: &str) -> &mut Self {
        self.add(name, Rec::Txt(text.into()))
    }

    /// Sets what happens to queries for `name` (`qtype` None: every type,
    /// else only that type, e.g. `Some("AAAA")`).
    pub fn behaviour(&mut self, name: &str, qtype: Option<&str>, b: Behaviour) -> &mut Self {
        let qtype = qtype.map(|t| t.parse::<RecordType>().expect("record type"));
        self.behaviours.insert((key(name), qtype), b);
        self
    }

    /// Queries for `name` get SERVFAIL.
    pub fn servfail(&mut self, name: &str) -> &mut Self {
        self.behaviour(name, None, Behaviour::ServFail)
    }

    /// Queries for `name` get REFUSED.
    pub fn refused(&mut self, name: &str) -> &mut Self {
        self.behaviour(name, None, Behaviour::Refused)
    }

    /// Queries for `name` get NXDOMAIN (names without records get it anyway).
    pub fn nxdomain(&mut self, name: &str) -> &mut Self {
        self.behaviour(name, None, Behaviour::NxDomain)
    }

    /// Queries for `name` are never answered.
    pub fn timeout(&mut self, name: &str) -> &mut Self {
        self.behaviour(name, None, Behaviour::Timeout)
    }

    /// UDP answers for `name` are truncated (TC=1), TCP answers are whole.
    pub fn truncate_udp(&mut self, name: &str) -> &mut Self {
        self.behaviour(name, None, Behaviour::TruncateUdp)
    }

    /// Removes every record and behaviour of `name`.
    pub fn remove(&mut self, name: &str) -> &mut Self {
        let k = key(name);
        self.records.retain(|(n, _, _)| *n != k);
        self.behaviours.retain(|(n, _), _| *n != k);
        self
    }

    /// Removes the records of one type at `name` (`"MX"`, `"A"`...).
    pub fn remove_type(&mut self, name: &str, qtype: &str) -> &mut Self {
        let k = key(name);
        let t: RecordType = qtype.parse().expect("record type");
        self.records
            .retain(|(n, _, r)| !(*n == k && r.record_type() == t));
        self
    }

    fn exists(&self, name: &str) -> bool {
        let suffix = format!(".{name}");
        self.records
            .iter()
            .any(|(n, _, _)| n == name || n.ends_with(&suffix))
    }

    fn behaviour_for(&self, name: &str, qtype: RecordType) -> Option<Behaviour> {
        let k = key(name);
        self.behaviours
            .get(&(k.clone(), Some(qtype)))
            .or_else(|| self.behaviours.get(&(k, None)))
            .copied()
    }

    /// The response to `query` (None: do not answer).
    fn respond(&self, query: &Message, udp: bool) -> Option<Message> {
        let q = query.queries.first()?;
        let qname = key(&q.name().to_ascii());
        let qtype = q.query_type();
        let mut resp = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
        resp.metadata.recursion_desired = query.metadata.recursion_desired;
        resp.metadata.recursion_available = true;
        resp.add_query(q.clone());
        if let Some(edns) = &query.edns {
            let mut e = Edns::new();
            e.set_max_payload(edns.max_payload().max(512));
            resp.set_edns(e);
        }
        match self.behaviour_for(&qname, qtype) {
            Some(Behaviour::Timeout) => return None,
            Some(Behaviour::ServFail) => {
                resp.metadata.response_code = ResponseCode::ServFail;
                return Some(resp);
            }
            Some(Behaviour::Refused) => {
                resp.metadata.response_code = ResponseCode::Refused;
                return Some(resp);
            }
            Some(Behaviour::NxDomain) => {
                resp.metadata.response_code = ResponseCode::NXDomain;
                resp.add_authority(self.soa(&qname));
                return Some(resp);
            }
            Some(Behaviour::TruncateUdp) if udp => {
                resp.metadata.truncation = true;
                return Some(resp);
            }
            Some(Behaviour::TruncateUdp) | None => {}
        }
        // Follow CNAMEs like a recursive resolver, collecting the chain.
        let mut current = qname.clone();
        let mut found = false;
        for _ in 0..8 {
            let here: Vec<&(String, u32, Rec)> = self
                .records
                .iter()
                .filter(|(n, _, _)| *n == current)
                .collect();
            let cname = here.iter().find_map(|(_, ttl, r)| match r {
                Rec::Cname(t) => Some((*ttl, t.clone())),
                _ => None,
            });
            if let (Some((ttl, target)), false) = (cname, qtype == RecordType::CNAME) {
                resp.add_answer(Record::from_rdata(
                    name(&current),
                    ttl,
                    RData::CNAME(CNAME(name(&target))),
                ));
                current = target;
                continue;
            }
            for (n, ttl, r) in here {
                if r.record_type() == qtype {
                    resp.add_answer(Record::from_rdata(name(n), *ttl, r.rdata()));
                    found = true;
                }
            }
            break;
        }
        if !found {
            if !self.exists(&current) {
                resp.metadata.response_code = ResponseCode::NXDomain;
            }
            resp.add_authority(self.soa(&current));
        }
        Some(resp)
    }

    fn soa(&self, name_in_zone: &str) -> Record {
        let apex = name_in_zone.rsplit('.').next().unwrap_or("test");
        Record::from_rdata(
            name(apex),
            self.negative_ttl,
            RData::SOA(SOA::new(
                name(&format!("ns.{apex}")),
                name(&format!("hostmaster.{apex}")),
                1,
                3600,
                600,
                86400,
                self.negative_ttl,
            )),
        )
    }
}

/// Open TCP connections: a clone of each stream (to shut it) and its thread.
type Connections = Arc<Mutex<Vec<(TcpStream, JoinHandle<()>)>>>;

#[derive(Default)]
struct Counters {
    total: AtomicUsize,
    tcp: AtomicUsize,
    by_name: Mutex<HashMap<(String, String), usize>>,
}

/// The running server; stops on drop.
pub struct TestDns {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    connections: Connections,
}

impl TestDns {
    /// Starts serving `zone` on 127.0.0.1, UDP and TCP on the same free port.
    pub fn start(zone: Zone) -> TestDns {
        let (udp, tcp) = bind_pair();
        let addr = udp.local_addr().expect("udp addr");
        let zone = Arc::new(Mutex::new(zone));
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let connections: Connections = Arc::default();
        let mut threads = Vec::new();
        {
            let (zone, counters, stop) = (zone.clone(), counters.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("test-dns-udp".into())
                    .spawn(move || serve_udp(udp, &zone, &counters, &stop))
                    .expect("spawn"),
            );
        }
        {
            let (zone, counters, stop, conns) = (
                zone.clone(),
                counters.clone(),
                stop.clone(),
                connections.clone(),
            );
            threads.push(
                std::thread::Builder::new()
                    .name("test-dns-tcp".into())
                    .spawn(move || {
                        for conn in tcp.incoming() {
                            if stop.load(Ordering::SeqCst) {
                                break;
                            }
                            let Ok(conn) = conn else { continue };
                            let Ok(clone) = conn.try_clone() else {
                                continue;
                            };
                            let (zone, counters) = (zone.clone(), counters.clone());
                            let handle = std::thread::Builder::new()
                                .name("test-dns-conn".into())
                                .spawn(move || serve_tcp(conn, &zone, &counters))
                                .expect("spawn");
                            conns.lock().unwrap().push((clone, handle));
                        }
                    })
                    .expect("spawn"),
            );
        }
        TestDns {
            addr,
            zone,
            counters,
            stop,
            threads,
            connections,
        }
    }

    /// The address to put in `[dns] nameservers`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The zone, locked: change it while the server runs.
    pub fn zone(&self) -> MutexGuard<'_, Zone> {
        self.zone.lock().unwrap()
    }

    /// Runs `f` on the zone.
    pub fn update(&self, f: impl FnOnce(&mut Zone)) {
        f(&mut self.zone());
    }

    /// Queries received (UDP and TCP, answered or not).
    pub fn queries(&self) -> usize {
        self.counters.total.load(Ordering::SeqCst)
    }

    /// Queries received over TCP.
    pub fn tcp_queries(&self) -> usize {
        self.counters.tcp.load(Ordering::SeqCst)
    }

    /// Queries received for `name` and type (`"MX"`, `"A"`, `"AAAA"`...).
    pub fn queries_for(&self, name: &str, qtype: &str) -> usize {
        let k = (key(name), qtype.to_ascii_uppercase());
        *self.counters.by_name.lock().unwrap().get(&k).unwrap_or(&0)
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking recv and accept so the threads see the flag.
        if let Ok(s) = UdpSocket::bind("127.0.0.1:0") {
            let _ = s.send_to(b"", self.addr);
        }
        let _ = TcpStream::connect(self.addr);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Connection threads block in read: shutting the socket ends them.
        let conns = std::mem::take(&mut *self.connections.lock().unwrap());
        for (stream, handle) in conns {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            let _ = handle.join();
        }
    }
}

fn bind_pair() -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().expect("addr").port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) {
            return (udp, tcp);
        }
    }
    panic!("no port free for both UDP and TCP");
}

fn count(counters: &Counters, query: &Message, tcp: bool) {
    counters.total.fetch_add(1, Ordering::SeqCst);
    if tcp {
        counters.tcp.fetch_add(1, Ordering::SeqCst);
    }
    if let Some(q) = query.queries.first() {
        let k = (key(&q.name().to_ascii()), q.query_type().to_string());
        *counters.by_name.lock().unwrap().entry(k).or_insert(0) += 1;
    }
}

fn serve_udp(socket: UdpSocket, zone: &Mutex<Zone>, counters: &Counters, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(query) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        count(counters, &query, false);
        let response = zone.lock().unwrap().respond(&query, true);
        let Some(mut response) = response else {
            continue;
        };
        let limit = query
            .edns
            .as_ref()
            .map_or(512, |e| e.max_payload().max(512));
        let mut bytes = response.to_vec().expect("encode response");
        if bytes.len() > usize::from(limit) {
            response = response.truncate();
            bytes = response.to_vec().expect("encode response");
        }
        let _ = socket.send_to(&bytes, peer);
    }
}

fn serve_tcp(mut conn: TcpStream, zone: &Mutex<Zone>, counters: &Counters) {
    loop {
        let mut len = [0u8; 2];
        if conn.read_exact(&mut len).is_err() {
            return;
        }
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if conn.read_exact(&mut buf).is_err() {
            return;
        }
        let Ok(query) = Message::from_vec(&buf) else {
            return;
        };
        count(counters, &query, true);
        let response = zone.lock().unwrap().respond(&query, false);
        let Some(response) = response else {
            continue;
        };
        let bytes = response.to_vec().expect("encode response");
        let mut framed = Vec::with_capacity(bytes.len() + 2);
        framed.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        framed.extend_from_slice(&bytes);
        if conn.write_all(&framed).is_err() {
            return;
        }
    }
}
