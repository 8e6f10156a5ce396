//! Connection limits shared by all shards.
//!
//! The kernel spreads connections over shards by 4-tuple hash, so one client
//! IP lands on every shard: per-IP and total counts must be global. A mutex
//! per accepted connection is cheap next to the accept itself.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `server.max_connections` reached.
    TooManyConnections,
    /// `server.max_connections_per_ip` reached for this client.
    TooManyFromIp,
}

impl Refusal {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::TooManyConnections => "max_connections",
            Refusal::TooManyFromIp => "max_connections_per_ip",
        }
    }

    /// The one-line reply sent before closing (RFC 5321 3.8: 421 at greeting).
    pub fn reply_line(self, hostname: &str) -> String {
        match self {
            Refusal::TooManyConnections => {
                format!("421 4.7.0 {hostname} Too many connections, try again later\r\n")
            }
            Refusal::TooManyFromIp => {
                format!("421 4.7.0 {hostname} Too many connections from your address\r\n")
            }
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Counts open connections; hand out a [`ConnectionPermit`] per connection.
#[derive(Debug)]
pub struct ConnectionLimiter {
    max_total: usize,
    max_per_ip: usize,
    counts: Mutex<Counts>,
}

impl ConnectionLimiter {
    /// A limiter with the given maxima.
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(ConnectionLimiter {
            max_total,
            max_per_ip,
            counts: Mutex::new(Counts::default()),
        })
    }

    /// Admits a connection from `ip`, or says why not. The permit releases
    /// the slot when dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, Refusal> {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if c.total >= self.max_total {
            return Err(Refusal::TooManyConnections);
        }
        let n = c.per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(Refusal::TooManyFromIp);
        }
        *n += 1;
        c.total += 1;
        Ok(ConnectionPermit {
            limiter: Arc::clone(self),
            ip,
        })
    }

    /// Open connections right now.
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

/// One admitted connection; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnectionPermit {
    limiter: Arc<ConnectionLimiter>,
    ip: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut c = self
            .limiter
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        c.total -= 1;
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                // Keep the map as small as the set of connected clients.
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_total_and_per_ip() {
        let l = ConnectionLimiter::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let p1 = l.admit(a).unwrap();
        let _p2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).unwrap_err(), Refusal::TooManyFromIp);
        let _p3 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).unwrap_err(), Refusal::TooManyConnections);
        drop(p1);
        assert_eq!(l.open(), 2);
        let _p4 = l.admit(a).unwrap();
        assert_eq!(l.open(), 3);
    }
}
