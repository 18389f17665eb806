//! Redis Cluster topology operations the failover tests use: which node serves a key, and a
//! manual failover of that node to one of its replicas (`CLUSTER FAILOVER`, the graceful kind:
//! the replica catches up with its primary before the roles swap, so no acknowledged write is
//! lost).

use std::time::Duration;

use redis::RedisError;

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub id: String,
    /// `host:port`.
    pub addr: String,
    pub primary: bool,
    /// The primary's id, for a replica.
    pub primary_id: Option<String>,
    /// Whether the node is marked failing.
    pub failing: bool,
    /// Slot ranges served (primaries), inclusive.
    pub slots: Vec<(u16, u16)>,
}

/// Parses `CLUSTER NODES`: `<id> <ip:port@cport[,hostname]> <flags> <primary> <ping> <pong>
/// <epoch> <link> <slot> <slot> ...`.
pub fn parse_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let addr = f[1].split('@').next()?.to_string();
            let flags: Vec<&str> = f[2].split(',').collect();
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|x| (x, x)),
                })
                .collect();
            Some(ClusterNode {
                id: f[0].to_string(),
                addr,
                primary: flags.contains(&"master"),
                primary_id: (f[3] != "-").then(|| f[3].to_string()),
                failing: flags.iter().any(|x| x.starts_with("fail")),
                slots,
            })
        })
        .collect()
}

async fn connect(url: &str) -> Result<redis::aio::MultiplexedConnection, RedisError> {
    redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await
}

fn url_of(addr: &str) -> String {
    format!("redis://{addr}")
}

/// The cluster's nodes, as any reachable node of `urls` sees them.
pub async fn nodes(urls: &[String]) -> Result<Vec<ClusterNode>, RedisError> {
    let mut last = None;
    for url in urls {
        match connect(url).await {
            Ok(mut c) => {
                let text: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut c)
                    .await?;
                return Ok(parse_nodes(&text));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .unwrap_or_else(|| RedisError::from(std::io::Error::other("no cluster node URL given"))))
}

fn failed(what: &str) -> RedisError {
    RedisError::from(std::io::Error::other(what.to_string()))
}

/// The primary serving `key` and a healthy replica of it.
async fn primary_and_replica_of(
    urls: &[String],
    key: &str,
) -> Result<(ClusterNode, ClusterNode), RedisError> {
    let mut any = connect(&urls[0]).await?;
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut any)
        .await?;
    let all = nodes(urls).await?;
    let primary = all
        .iter()
        .find(|n| n.primary && n.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
        .ok_or_else(|| failed("no primary serves the slot"))?;
    let replica = all
        .iter()
        .find(|n| n.primary_id.as_deref() == Some(primary.id.as_str()) && !n.failing)
        .ok_or_else(|| failed("the primary has no replica"))?;
    Ok((primary.clone(), replica.clone()))
}

/// Waits until the node at `addr` reports itself primary (at most `secs` seconds).
async fn until_primary(addr: &str, secs: u64) -> Result<(), RedisError> {
    for _ in 0..secs * 20 {
        if let Ok(mut c) = connect(&url_of(addr)).await {
            let role: Result<Vec<redis::Value>, _> = redis::cmd("ROLE").query_async(&mut c).await;
            if let Ok(role) = role
                && role.first() == Some(&redis::Value::BulkString(b"master".to_vec()))
            {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(failed(&format!("{addr} did not take over within {secs} s")))
}

/// Fails the primary serving `key` over to one of its replicas and waits until the replica
/// reports itself primary. Returns the promoted node's `host:port`.
pub async fn fail_over_primary_of(urls: &[String], key: &str) -> Result<String, RedisError> {
    let (_, replica) = primary_and_replica_of(urls, key).await?;
    let mut c = connect(&url_of(&replica.addr)).await?;
    let _: () = redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .query_async(&mut c)
        .await?;
    until_primary(&replica.addr, 10).await?;
    Ok(replica.addr)
}

/// A primary killed by [`kill_primary_of`], and what it takes to start it again.
#[derive(Debug, Clone)]
pub struct KilledPrimary {
    /// The replica that took over, `host:port`.
    pub promoted: String,
    /// The killed node, `host:port`.
    pub addr: String,
    /// Its settings file (the test cluster of `scripts/redis-cluster` writes one per node).
    pub config: String,
}

/// Kills the primary serving `key` outright (`SIGKILL`, the way a crashed or lost machine
/// goes), on this machine, and waits until its replica has taken over (the cluster's node
/// timeout, then an election).
pub async fn kill_primary_of(urls: &[String], key: &str) -> Result<KilledPrimary, RedisError> {
    let (primary, replica) = primary_and_replica_of(urls, key).await?;
    let mut c = connect(&url_of(&primary.addr)).await?;
    let dir: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("dir")
        .query_async(&mut c)
        .await?;
    let dir = dir
        .into_iter()
        .nth(1)
        .ok_or_else(|| failed("no dir setting"))?;
    let pid: String = redis::cmd("INFO")
        .arg("server")
        .query_async::<String>(&mut c)
        .await?
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .map(|p| p.trim().to_string())
        .ok_or_else(|| failed("no process id"))?;
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .map_err(RedisError::from)?;
    if !killed.success() {
        return Err(failed(&format!("kill -KILL {pid} failed")));
    }
    until_primary(&replica.addr, 20).await?;
    Ok(KilledPrimary {
        promoted: replica.addr,
        addr: primary.addr,
        config: format!("{dir}/redis.conf"),
    })
}

impl KilledPrimary {
    /// Starts the killed node again and waits until it serves as a replica in sync (it
    /// rejoins as one of the node that took over).
    pub async fn restart(&self) -> Result<(), RedisError> {
        let started = std::process::Command::new("redis-server")
            .arg(&self.config)
            .status()
            .map_err(RedisError::from)?;
        if !started.success() {
            return Err(failed(&format!("redis-server {} failed", self.config)));
        }
        for _ in 0..600 {
            if let Ok(mut c) = connect(&url_of(&self.addr)).await {
                let info: Result<String, _> = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut c)
                    .await;
                if info.is_ok_and(|i| i.contains("master_link_status:up")) {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(failed(&format!("{} did not rejoin within 30 s", self.addr)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_parse_with_their_roles_and_slots() {
        let text = "\
07c3 127.0.0.1:7101@17101 myself,master - 0 0 1 connected 0-5460
9a1b 127.0.0.1:7104@17104 slave 07c3 0 1700000000000 1 connected
6e2f 127.0.0.1:7102@17102,host master - 0 1700000000000 2 connected 5461-10922 12000 [93-<-9a1b]
";
        let nodes = parse_nodes(text);
        assert_eq!(nodes.len(), 3);
        assert!(nodes[0].primary);
        assert_eq!(nodes[0].slots, [(0, 5460)]);
        assert_eq!(nodes[1].primary_id.as_deref(), Some("07c3"));
        assert!(!nodes[1].primary);
        assert_eq!(nodes[2].addr, "127.0.0.1:7102");
        assert_eq!(nodes[2].slots, [(5461, 10922), (12000, 12000)]);
    }
}
