//! `auth_type = hba`: rules in PostgreSQL's pg_hba.conf format (PgBouncer's
//! `auth_hba_file`) choose the authentication method per connection.
//!
//! Supported: `local`, `host`, `hostssl`, `hostnossl`; database and user lists
//! (comma-separated, `all`, `sameuser`, quoted names); addresses as CIDR,
//! a bare IP, `IP MASK`, or `all`; methods `trust`, `reject`, `md5`,
//! `password`, `scram-sha-256`, `cert` and `peer`. The first matching line
//! decides; no match rejects, as in PostgreSQL.

use std::net::IpAddr;

/// What a matching line asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Trust,
    Reject,
    Md5,
    Password,
    ScramSha256,
    Cert,
    Peer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnType {
    Local,
    Host,
    HostSsl,
    HostNoSsl,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Names {
    All,
    /// The database named like the user (`sameuser`) or any of these names.
    List {
        sameuser: bool,
        names: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Addr {
    All,
    Net { addr: IpAddr, prefix: u8 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    conn: ConnType,
    databases: Names,
    users: Names,
    addr: Option<Addr>,
    method: Method,
}

/// The parsed rules of one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hba {
    rules: Vec<Rule>,
}

/// One incoming connection as the rules see it.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// `None` for a Unix socket.
    pub ip: Option<IpAddr>,
    pub tls: bool,
}

impl Hba {
    /// Parses the file's text; errors give the 1-based line and what is wrong.
    pub fn parse(text: &str) -> Result<Hba, (usize, String)> {
        let mut rules = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let fields = split_fields(line);
            if fields.is_empty() {
                continue;
            }
            rules.push(rule(&fields).map_err(|m| (i + 1, m))?);
        }
        Ok(Hba { rules })
    }

    /// The method for `user` asking for `database` from `peer`.
    pub fn method(&self, peer: Peer, database: &str, user: &str) -> Method {
        self.rules
            .iter()
            .find(|r| r.matches(peer, database, user))
            .map_or(Method::Reject, |r| r.method)
    }
}

impl Rule {
    fn matches(&self, peer: Peer, database: &str, user: &str) -> bool {
        let conn_ok = match (self.conn, peer.ip) {
            (ConnType::Local, None) => true,
            (ConnType::Host, Some(_)) => true,
            (ConnType::HostSsl, Some(_)) => peer.tls,
            (ConnType::HostNoSsl, Some(_)) => !peer.tls,
            _ => false,
        };
        if !conn_ok {
            return false;
        }
        let db_ok = match &self.databases {
            Names::All => true,
            Names::List { sameuser, names } => {
                (*sameuser && database == user) || names.iter().any(|n| n == database)
            }
        };
        let user_ok = match &self.users {
            Names::All => true,
            Names::List { names, .. } => names.iter().any(|n| n == user),
        };
        let addr_ok = match (&self.addr, peer.ip) {
            (None, _) | (Some(Addr::All), _) => true,
            (Some(Addr::Net { addr, prefix }), Some(ip)) => in_net(ip, *addr, *prefix),
            (Some(_), None) => false,
        };
        db_ok && user_ok && addr_ok
    }
}

fn rule(f: &[String]) -> Result<Rule, String> {
    let conn = match f[0].as_str() {
        "local" => ConnType::Local,
        "host" => ConnType::Host,
        "hostssl" => ConnType::HostSsl,
        "hostnossl" => ConnType::HostNoSsl,
        other => return Err(format!("unknown connection type {other:?}")),
    };
    let need = if conn == ConnType::Local { 4 } else { 5 };
    if f.len() < need {
        return Err(format!(
            "expected {} fields (type, database, user{}, method)",
            need,
            if conn == ConnType::Local {
                ""
            } else {
                ", address"
            }
        ));
    }
    let databases = names(&f[1], true)?;
    let users = names(&f[2], false)?;
    let (addr, method_at) = if conn == ConnType::Local {
        (None, 3)
    } else {
        address(f)?
    };
    let method = match f.get(method_at).map(String::as_str) {
        Some("trust") => Method::Trust,
        Some("reject") => Method::Reject,
        Some("md5") => Method::Md5,
        Some("password") => Method::Password,
        Some("scram-sha-256") => Method::ScramSha256,
        Some("cert") => Method::Cert,
        Some("peer") if conn == ConnType::Local => Method::Peer,
        Some("peer") => return Err("method peer is only for local connections".into()),
        Some(other) => return Err(format!("unsupported authentication method {other:?}")),
        None => return Err("missing authentication method".into()),
    };
    Ok(Rule {
        conn,
        databases,
        users,
        addr,
        method,
    })
}

/// The address field(s) of a host line and where the method field is.
fn address(f: &[String]) -> Result<(Option<Addr>, usize), String> {
    let a = f[3].as_str();
    if a == "all" {
        return Ok((Some(Addr::All), 4));
    }
    if let Some((ip, bits)) = a.split_once('/') {
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| format!("invalid IP address {ip:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = bits
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("invalid CIDR mask in {a:?}"))?;
        return Ok((Some(Addr::Net { addr, prefix }), 4));
    }
    let addr: IpAddr = a.parse().map_err(|_| {
        format!("invalid address {a:?} (host names and samehost/samenet are not supported)")
    })?;
    // `IP MASK` in two fields, or a bare IP meaning just that host.
    if let Some(mask) = f.get(4).and_then(|m| m.parse::<IpAddr>().ok()) {
        let prefix = mask_prefix(mask).ok_or_else(|| format!("invalid netmask {}", f[4]))?;
        return Ok((Some(Addr::Net { addr, prefix }), 5));
    }
    let prefix = if addr.is_ipv4() { 32 } else { 128 };
    Ok((Some(Addr::Net { addr, prefix }), 4))
}

fn mask_prefix(mask: IpAddr) -> Option<u8> {
    let bits: u128 = match mask {
        IpAddr::V4(m) => u128::from(u32::from(m)) << 96,
        IpAddr::V6(m) => u128::from(m),
    };
    let ones = bits.leading_ones();
    (bits.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

fn in_net(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    let (a, b, width) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(u32::from(a)), u128::from(u32::from(b)), 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        (IpAddr::V6(a), IpAddr::V4(b)) => match a.to_ipv4_mapped() {
            Some(a) => (u128::from(u32::from(a)), u128::from(u32::from(b)), 32),
            None => return false,
        },
        (IpAddr::V4(_), IpAddr::V6(_)) => return false,
    };
    let prefix = u32::from(prefix).min(width);
    if prefix == 0 {
        return true;
    }
    let shift = width - prefix;
    (a >> shift) == (b >> shift)
}

fn names(field: &str, database: bool) -> Result<Names, String> {
    let mut sameuser = false;
    let mut list = Vec::new();
    for item in field.split(',') {
        let quoted = item.starts_with('"');
        let name = item.trim_matches('"');
        match name {
            "all" if !quoted => return Ok(Names::All),
            "sameuser" if database && !quoted => sameuser = true,
            "replication" if database && !quoted => {} // never matches: no replication
            n if !quoted && (n.starts_with('@') || n.starts_with('+')) => {
                return Err(format!("{n:?}: @file and +group entries are not supported"))
            }
            n => list.push(n.to_string()),
        }
    }
    Ok(Names::List {
        sameuser,
        names: list,
    })
}

/// Whitespace-separated fields; `#` starts a comment outside quotes; double
/// quotes keep spaces and commas (and stay on the field, so keywords quoted
/// are names).
fn split_fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            '#' if !quoted => break,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    // A list may have blanks around its commas (`user1,user2 , user3`): one field.
    let mut joined: Vec<String> = Vec::with_capacity(out.len());
    for field in out {
        match joined.last_mut() {
            Some(prev) if prev.ends_with(',') || field.starts_with(',') => prev.push_str(&field),
            _ => joined.push(field),
        }
    }
    joined
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(ip: &str) -> Peer {
        Peer {
            ip: Some(ip.parse().unwrap()),
            tls: false,
        }
    }

    #[test]
    fn list_with_blanks_around_commas_is_one_field() {
        assert_eq!(
            split_fields("host tmp1,all user1,user2 , user3 16.0.0.0/8 md5"),
            ["host", "tmp1,all", "user1,user2,user3", "16.0.0.0/8", "md5"]
        );
    }

    #[test]
    fn first_matching_line_wins() {
        let hba = Hba::parse(
            "# comment\n\
             local all all peer\n\
             host app bob 127.0.0.1/32 reject\n\
             host app,\"other db\" all 127.0.0.0 255.0.0.0 md5\n\
             hostssl all all 0.0.0.0/0 scram-sha-256\n\
             host sameuser all ::1 trust\n",
        )
        .unwrap();
        let local = Peer {
            ip: None,
            tls: false,
        };
        assert_eq!(hba.method(local, "app", "x"), Method::Peer);
        assert_eq!(hba.method(tcp("127.0.0.1"), "app", "bob"), Method::Reject);
        assert_eq!(hba.method(tcp("127.0.0.2"), "app", "bob"), Method::Md5);
        assert_eq!(hba.method(tcp("127.9.0.2"), "other db", "x"), Method::Md5);
        assert_eq!(hba.method(tcp("10.0.0.1"), "app", "x"), Method::Reject);
        let tls = Peer {
            ip: Some("10.0.0.1".parse().unwrap()),
            tls: true,
        };
        assert_eq!(hba.method(tls, "app", "x"), Method::ScramSha256);
        assert_eq!(hba.method(tcp("::1"), "carol", "carol"), Method::Trust);
        assert_eq!(hba.method(tcp("::1"), "app2", "carol"), Method::Reject);
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(
            Hba::parse("local all all trust\nhost all all 1.2.3.4/40 md5\n")
                .unwrap_err()
                .0,
            2
        );
        assert!(Hba::parse("host all all 0.0.0.0/0 ident\n").is_err());
        assert!(Hba::parse("host all +admins 0.0.0.0/0 md5\n").is_err());
    }

    #[test]
    fn ipv4_mapped_clients_match_ipv4_rules() {
        let hba = Hba::parse("host all all 127.0.0.0/8 trust\n").unwrap();
        assert_eq!(hba.method(tcp("::ffff:127.0.0.1"), "a", "b"), Method::Trust);
    }
}
