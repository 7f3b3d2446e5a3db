//! The configuration file: every key users may write, its default and the
//! reason for that default. Owns parsing and validation; never opens sockets
//! or files other than the config file itself.
//!
//! A config is either fully valid or refused with a message that names the
//! offending key, so that `petrel check-config` and `petrel serve` can exit 2
//! before touching anything.

mod dnsbl;
mod units;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use units::{ByteSize, HumanDuration};

pub use dnsbl::Blocklist;

use crate::protocol::address::Domain;

/// Where the config is looked for when no `-c` is given, after the
/// `PETREL_CONFIG` environment variable: the working directory, then the
/// system-wide file.
pub const LOCAL_CONFIG_FILE: &str = "petrel.toml";
pub const SYSTEM_CONFIG_FILE: &str = "/etc/petrel/petrel.toml";
pub const CONFIG_ENV: &str = "PETREL_CONFIG";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// EHLO name, Received headers, bounces. Defaults to the system host name
    /// because that is what a peer sees in reverse DNS on a typical VPS.
    pub hostname: String,
    /// Queue database, Maildirs and generated certificates live here.
    pub data_dir: PathBuf,
    /// MX / relay listener; STARTTLS offered, AUTH optional.
    #[serde(default = "ListenerConfig::default_smtp")]
    pub smtp: ListenerConfig,
    /// Submission for users (RFC 6409): AUTH required, after STARTTLS.
    #[serde(default = "ListenerConfig::default_submission")]
    pub submission: ListenerConfig,
    /// Submission over implicit TLS (RFC 8314): AUTH required.
    #[serde(default = "ListenerConfig::default_smtps")]
    pub smtps: ListenerConfig,
    pub tls: TlsConfig,
    pub domains: DomainsConfig,
    /// address -> one or more addresses, expanded when a message is queued.
    pub aliases: BTreeMap<String, AliasTargets>,
    pub relay: RelayConfig,
    pub delivery: DeliveryConfig,
    pub dns: DnsConfig,
    pub queue: QueueConfig,
    pub limits: LimitsConfig,
    pub auth: AuthConfig,
    pub sendmail: SendmailConfig,
    pub server: ServerConfig,
    pub dkim: DkimConfig,
    pub mail_auth: MailAuthConfig,
    pub antispam: AntispamConfig,
    /// Content filters (`[[milter]]` tables), asked in order.
    pub milter: Vec<MilterConfig>,
}

/// One content filter spoken to over the milter protocol (see
/// src/intake/milter.rs): rspamd, OpenDKIM, OpenDMARC, ClamAV.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MilterConfig {
    /// `unix:/path/to/socket` or `inet:host:port`.
    pub address: String,
    /// The listeners whose mail it sees: smtp, submission, smtps, local.
    pub on: Vec<String>,
    /// When it cannot be asked (down, too slow, talking nonsense).
    pub on_failure: OnFailure,
    pub connect_timeout: HumanDuration,
    /// For each reply.
    pub command_timeout: HumanDuration,
    /// For the whole message, from its first header to the verdict.
    pub content_timeout: HumanDuration,
}

impl Default for MilterConfig {
    fn default() -> Self {
        // Postfix's milter_*_timeout defaults.
        MilterConfig {
            address: String::new(),
            on: vec!["smtp".into()],
            on_failure: OnFailure::Tempfail,
            connect_timeout: HumanDuration::secs(30),
            command_timeout: HumanDuration::secs(30),
            content_timeout: HumanDuration::secs(300),
        }
    }
}

/// Where a milter listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MilterAddress {
    Unix(PathBuf),
    /// "host:port", resolved when connecting.
    Inet(String),
}

impl MilterAddress {
    pub fn parse(text: &str) -> Result<MilterAddress, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("{text:?}: the socket path must be absolute"));
            }
            return Ok(MilterAddress::Unix(PathBuf::from(path)));
        }
        if let Some(address) = text.strip_prefix("inet:") {
            parse_host_port(address).map_err(|why| format!("{text:?}: {why}"))?;
            return Ok(MilterAddress::Inet(address.to_string()));
        }
        Err(format!(
            "{text:?} is not unix:/path/to/socket nor inet:host:port"
        ))
    }
}

impl fmt::Display for MilterAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MilterAddress::Unix(path) => write!(f, "unix:{}", path.display()),
            MilterAddress::Inet(address) => write!(f, "inet:{address}"),
        }
    }
}

/// What becomes of a message when a milter cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// 451: the sender tries again later.
    #[default]
    Tempfail,
    /// As if the milter had accepted it.
    Accept,
    /// 554: refused for good.
    Reject,
}

/// The gate in front of the MX port (see src/intake/gate.rs), in the
/// spirit of Postfix's postscreen: clients that talk before the greeting
/// ends, and clients on DNS blocklists, are refused before a session
/// starts. Never for `relay.trusted_networks`, the submission ports or
/// local programs; loopback clients only with `check_loopback`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AntispamConfig {
    /// Greet with the first line of a two-line 220, wait `greet_wait`,
    /// then send the last: a client that sends anything before the
    /// greeting ends is a bot. On by default: a real client waits for the
    /// greeting anyway, and pays `greet_wait` once per `pass_ttl`.
    pub pregreet: bool,
    pub greet_wait: HumanDuration,
    /// A client that passed is greeted at once for this long (per
    /// address; IPv6 per /64).
    pub pass_ttl: HumanDuration,
    /// DNS block and allow lists, postscreen's syntax:
    /// `zone[=filter][*weight]`, e.g. `zen.spamhaus.org*2`,
    /// `list.dnswl.org=127.0.[0..255].[1..3]*-3`. Empty by default: lists
    /// have terms of use.
    pub dnsbl: Vec<String>,
    /// A client whose weights add up to this is refused.
    pub dnsbl_threshold: i32,
    /// One deadline for all lists; a list that has not answered by then
    /// counts as not listing the client (and is logged).
    pub dnsbl_timeout: HumanDuration,
    /// Screen loopback clients too (for tests of the gate; local programs
    /// normally use loopback).
    pub check_loopback: bool,
}

impl Default for AntispamConfig {
    fn default() -> Self {
        AntispamConfig {
            pregreet: true,
            greet_wait: HumanDuration::secs(2),
            pass_ttl: HumanDuration::secs(86_400),
            dnsbl: Vec::new(),
            dnsbl_threshold: 1,
            dnsbl_timeout: HumanDuration::secs(5),
            check_loopback: false,
        }
    }
}

/// SPF, DKIM and DMARC checks of mail arriving on the MX port (see
/// src/mailauth).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailAuthConfig {
    /// Check SPF at MAIL FROM, DKIM and DMARC at the end of DATA, and add
    /// an Authentication-Results header. On by default: it is what every
    /// large receiver does, and it costs a few cached DNS queries.
    pub enabled: bool,
    /// Refuse (550 5.7.1) a message that fails DMARC when the From
    /// domain's policy is p=reject, as the domain asks (RFC 7489 6.7).
    /// false: only record the failure in the header.
    pub honour_dmarc_reject: bool,
    /// Clients in `relay.trusted_networks` are not checked: they are our
    /// own systems, and their mail often leaves from addresses SPF does
    /// not list.
    pub skip_trusted_networks: bool,
    /// Authenticated clients are not checked (they use submission; on the
    /// MX port they are known users all the same).
    pub skip_authenticated: bool,
}

impl Default for MailAuthConfig {
    fn default() -> Self {
        MailAuthConfig {
            enabled: true,
            honour_dmarc_reject: true,
            skip_trusted_networks: true,
            skip_authenticated: true,
        }
    }
}

/// DKIM signing of mail sent by local users (see src/dkim).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DkimConfig {
    /// Domains to sign for; empty: every local domain that has a key.
    pub domains: Vec<String>,
    /// The selector in use; keys are `key_dir/DOMAIN.SELECTOR.pem`. A key
    /// rollover publishes the new selector's record, switches this, and
    /// removes the old record a few days later.
    pub selector: String,
    /// Default: `data_dir/dkim`.
    pub key_dir: Option<PathBuf>,
}

impl Default for DkimConfig {
    fn default() -> Self {
        DkimConfig {
            domains: Vec::new(),
            selector: "petrel".into(),
            key_dir: None,
        }
    }
}

impl Config {
    /// Where DKIM keys live.
    pub fn dkim_key_dir(&self) -> PathBuf {
        self.dkim
            .key_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join(crate::store::data_dir::DKIM_DIR))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Started as root, petrel binds its ports, then becomes this user
    /// before serving anyone (and `petrel user|queue` become it too).
    pub user: Option<String>,
    /// Default: the user's primary group.
    pub group: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SendmailConfig {
    /// Members of this group (and root) may set any envelope sender with
    /// `sendmail -f`; everyone else sends as user@(first local domain).
    pub trusted_group: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: system_hostname(),
            // Relative on purpose: the built-in defaults are a local demo that
            // must not need root or touch anything outside the working directory.
            data_dir: PathBuf::from("petrel-data"),
            smtp: ListenerConfig::default_smtp(),
            submission: ListenerConfig::default_submission(),
            smtps: ListenerConfig::default_smtps(),
            tls: TlsConfig::default(),
            domains: DomainsConfig::default(),
            aliases: BTreeMap::new(),
            relay: RelayConfig::default(),
            delivery: DeliveryConfig::default(),
            dns: DnsConfig::default(),
            queue: QueueConfig::default(),
            limits: LimitsConfig::default(),
            auth: AuthConfig::default(),
            sendmail: SendmailConfig::default(),
            server: ServerConfig::default(),
            dkim: DkimConfig::default(),
            mail_auth: MailAuthConfig::default(),
            antispam: AntispamConfig::default(),
            milter: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Addresses to listen on; an empty list turns the listener off.
    pub listen: Vec<SocketAddr>,
}

impl ListenerConfig {
    // Loopback and unprivileged ports: the defaults are a demo that must be
    // safe to run on any machine without root and without exposing anything.
    fn default_smtp() -> Self {
        Self::on("127.0.0.1:2525")
    }
    fn default_submission() -> Self {
        Self::on("127.0.0.1:2587")
    }
    fn default_smtps() -> Self {
        Self::on("127.0.0.1:2465")
    }
    fn on(addr: &str) -> Self {
        ListenerConfig {
            listen: addr.parse().map(|a| vec![a]).unwrap_or_default(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain. Without cert and key, a self-signed certificate
    /// is generated into `data_dir` on first start.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DomainsConfig {
    /// Domains whose mail is delivered to local Maildirs.
    pub local: Vec<String>,
}

impl Default for DomainsConfig {
    fn default() -> Self {
        DomainsConfig {
            local: vec!["localhost".to_string()],
        }
    }
}

/// An alias maps to one address or to a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AliasTargets {
    One(String),
    Many(Vec<String>),
}

impl AliasTargets {
    pub fn as_slice(&self) -> &[String] {
        match self {
            AliasTargets::One(one) => std::slice::from_ref(one),
            AliasTargets::Many(many) => many,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Clients in these networks may relay without AUTH. Empty by default:
    /// an open relay is the one mistake a mail server must never ship with.
    pub trusted_networks: Vec<IpNet>,
}

impl RelayConfig {
    pub fn is_trusted(&self, ip: std::net::IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.trusted_networks.iter().any(|net| net.contains(&ip))
    }
}

/// An IPv4 client reached over an IPv6 socket shows up as `::ffff:a.b.c.d`;
/// policy must see the IPv4 address so `127.0.0.0/8` still matches.
pub fn canonical_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SmarthostTls {
    /// TLS required and the certificate verified (the default: credentials go there).
    #[default]
    Verify,
    /// TLS required, certificate not checked (self-signed internal relays).
    Encrypt,
    /// Plaintext allowed: only for a relay inside a trusted network.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AddressFamily {
    #[default]
    Any,
    Ipv4,
    Ipv6,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// "host:port": send all non-local mail there instead of to MX hosts.
    pub smarthost: Option<String>,
    pub smarthost_user: Option<String>,
    pub smarthost_password_file: Option<PathBuf>,
    pub smarthost_tls: SmarthostTls,
    /// Extra trust anchors for the smart host, e.g. an internal CA; a
    /// certificate in this file is also trusted when the smart host
    /// presents exactly it (a self-signed certificate, CA:TRUE or not).
    pub smarthost_ca: Option<PathBuf>,
    /// Trust the smart host's certificate with this SHA-256 fingerprint
    /// ("sha256:AB:CD:..." or plain hex), as an alternative to smarthost_ca.
    pub smarthost_fingerprint: Option<String>,
    /// Talk TLS from the first byte (RFC 8314). Default: only on port 465.
    pub smarthost_implicit_tls: Option<bool>,
    /// Port of remote MX hosts. 25 everywhere in the real world; tests change it.
    pub port: u16,
    /// Special-purpose networks (loopback, private, link-local ...) that MX,
    /// address and literal delivery may connect to, e.g. an internal MX.
    /// Empty by default: DNS is controlled by strangers, and without this
    /// rule they could point petrel at services behind the firewall.
    pub allowed_networks: Vec<IpNet>,
    /// Operators whose IPv6 has no reverse DNS need "ipv4".
    pub address_family: AddressFamily,
    /// Opportunistic STARTTLS to MX hosts: when the handshake fails, retry
    /// the host in plaintext (as Postfix's "may" level does) rather than
    /// deferring mail to servers with broken TLS forever.
    pub plaintext_fallback: bool,
    /// Parallel deliveries to remote hosts (MX and smart host).
    pub workers: usize,
    /// At most this many of them to one destination (a domain's MX hosts,
    /// or the smart host), as Postfix's default_destination_concurrency_limit:
    /// one dead or slow domain never holds every worker. A destination
    /// starts at 4 (or this, if lower), gains one per delivery that
    /// reaches it, and drops to 1 when it cannot be reached.
    pub destination_concurrency: usize,
    /// Deliveries into local Maildirs, in a lane of their own: local mail
    /// never waits behind remote hosts.
    pub local_workers: usize,
    /// Connecting to a remote host; RFC 5321 leaves it open, 30s is common.
    pub connect_timeout: HumanDuration,
    /// The most a remote server may take for one whole reply, however it
    /// trickles it (RFC 5321 4.5.3.2: 5 minutes; DATA's 354 waits at
    /// most 2). The reply after the message waits twice this (RFC: 10).
    pub reply_timeout: HumanDuration,
    /// One delivery attempt, every host tried included, ends after this
    /// long whatever the servers do: a hostile MX cannot hold a delivery
    /// worker longer.
    pub attempt_timeout: HumanDuration,
    /// Messages sent over one outbound SMTP connection before it is
    /// closed (0: a new connection per message). Connections wait for the
    /// next message to the same destination for `connection_idle`, as
    /// Postfix's connection cache does.
    pub connection_reuse_limit: usize,
    /// How long an outbound connection waits for another message before
    /// it is closed (Postfix: smtp_connection_cache_time_limit, 2s).
    pub connection_idle: HumanDuration,
    /// Honour the MTA-STS policies (RFC 8461) of the domains mail goes to
    /// by MX: a domain in `enforce` mode gets its mail only through the MX
    /// hosts its policy lists, over TLS with a valid certificate.
    pub mta_sts: bool,
    /// Trust anchors (PEM) besides the Mozilla roots for certificates that
    /// must be valid: MX hosts under MTA-STS and MTA-STS policy servers.
    /// For a private CA; the public internet needs none.
    pub ca_file: Option<PathBuf>,
    /// The HTTPS port MTA-STS policies are fetched from (RFC 8461: 443;
    /// other values are for test setups).
    pub mta_sts_port: u16,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            smarthost: None,
            smarthost_user: None,
            smarthost_password_file: None,
            smarthost_tls: SmarthostTls::Verify,
            smarthost_ca: None,
            smarthost_fingerprint: None,
            smarthost_implicit_tls: None,
            port: 25,
            allowed_networks: Vec::new(),
            address_family: AddressFamily::Any,
            plaintext_fallback: true,
            workers: 16,
            destination_concurrency: 8,
            local_workers: 2,
            connect_timeout: HumanDuration::secs(30),
            reply_timeout: HumanDuration::secs(5 * 60),
            attempt_timeout: HumanDuration::secs(15 * 60),
            connection_reuse_limit: 100,
            connection_idle: HumanDuration::secs(2),
            mta_sts: true,
            ca_file: None,
            mta_sts_port: 443,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Empty: the system resolver (/etc/resolv.conf). Tests point this at a
    /// DNS server on loopback.
    pub nameservers: Vec<SocketAddr>,
    /// Per query; a slow resolver must turn into a 4xx, not a stuck session.
    pub timeout: HumanDuration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: HumanDuration::secs(5),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// After this a recipient bounces. 5 days is the RFC 5321 4.5.4.1 advice.
    pub max_age: HumanDuration,
    /// First retry delay; doubled per attempt with jitter …
    pub retry_min: HumanDuration,
    /// … and capped here, so a long outage is still retried hourly.
    pub retry_max: HumanDuration,
    /// One "still trying" notice after this long; "0" turns it off.
    pub delay_warning: HumanDuration,
    /// New mail is refused with 452 4.3.1 while less than this is free on
    /// the filesystem of data_dir (Postfix's queue_minfree), so a full disk
    /// turns into senders retrying later, not into failed commits.
    pub min_free_space: ByteSize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_age: HumanDuration::secs(5 * 86_400),
            retry_min: HumanDuration::secs(5 * 60),
            retry_max: HumanDuration::secs(3600),
            delay_warning: HumanDuration::secs(4 * 3600),
            min_free_space: ByteSize::mib(100),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Advertised in EHLO SIZE and enforced while DATA streams in.
    pub max_message_size: ByteSize,
    /// Largest header section accepted (refused at end of DATA with 552).
    /// Real mail has a few KiB of headers; a huge header section is what a
    /// stranger would want reflected in a bounce.
    pub max_header_size: ByteSize,
    /// Longest line accepted in DATA, CRLF included (RFC 5321 says 1000,
    /// but HTML generators write longer ones; relayed mail is folded to 998).
    pub max_line_length: ByteSize,
    /// `Received:` fields a message may carry when it arrives; more is a
    /// mail loop (RFC 5321 6.3), refused at end of DATA. Postfix's
    /// hopcount_limit is 50 too.
    pub max_hops: usize,
    /// RFC 5321 4.5.3.1.8 asks servers to take at least 100.
    pub max_recipients: usize,
    /// Worker threads, hence concurrent sessions.
    pub max_sessions: usize,
    /// One client (address, or IPv6 /64) may not take every worker; 50, as
    /// Postfix's smtpd_client_connection_count_limit, lets a web
    /// application's pool or an office behind NAT send in parallel.
    pub max_sessions_per_ip: usize,
    /// Sessions port 25 can never take (at most half of max_sessions), so
    /// strangers flooding the MX port cannot keep users from sending.
    pub submission_reserved: usize,
    /// Local sessions (`sendmail` over the local socket, maildrop
    /// replays) at once, with workers of their own beside max_sessions:
    /// local users never take a TCP client's place ...
    pub max_local_sessions: usize,
    /// ... and one local user (uid) at most this many of them.
    pub max_local_sessions_per_user: usize,
    /// New connections a minute from one client (address or /64); more get
    /// 421. 0 turns it off. Trusted networks are exempt from this and from
    /// max_sessions_per_ip.
    pub max_connection_rate: u32,
    /// Errors (5xx replies) before a session is closed with 421: 20, as
    /// Postfix's smtpd_hard_error_limit, so that an open-relay scanner
    /// (about 16 refused probes in one session) finishes its report.
    pub max_errors: u32,
    /// After this many errors, each further error reply waits a second
    /// (Postfix's smtpd_soft_error_limit and smtpd_error_sleep_time).
    pub soft_errors: u32,
    /// Waiting for a command: RFC 5321 4.5.3.2.7 says at least 5 minutes.
    pub command_timeout: HumanDuration,
    /// DATA must start within this (RFC 5321 4.5.3.2.5 says 3 minutes) ...
    pub data_timeout: HumanDuration,
    /// ... and then keep at least this many octets per second: each read
    /// extends the deadline by its size over this rate, so a client that
    /// trickles a byte every few seconds is cut off (Postfix's
    /// smtpd_min_data_rate is 500).
    pub min_data_rate: ByteSize,
    /// A whole session, however busy, ends after this long.
    pub session_timeout: HumanDuration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_size: ByteSize::mib(25),
            max_header_size: ByteSize::mib(1),
            max_line_length: ByteSize(64 * 1024),
            max_hops: 50,
            max_recipients: 100,
            max_sessions: 256,
            max_sessions_per_ip: 50,
            submission_reserved: 64,
            max_local_sessions: 32,
            max_local_sessions_per_user: 8,
            max_connection_rate: 60,
            max_errors: 20,
            soft_errors: 10,
            command_timeout: HumanDuration::secs(300),
            data_timeout: HumanDuration::secs(180),
            min_data_rate: ByteSize(500),
            session_timeout: HumanDuration::secs(3600),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// An authenticated user may only send as their own address (or an alias
    /// that points at it); stops a stolen password from impersonating others.
    pub sender_login_match: bool,
    /// SMTP AUTH takes app passwords only (`petrel user app-password add`):
    /// a phished main password does not send mail.
    pub require_app_passwords: bool,
    /// Failed AUTH attempts per client address before replies are slowed down.
    pub slowdown_after: u32,
    /// Added per failure beyond `slowdown_after`, capped at 5 seconds.
    pub slowdown_step: HumanDuration,
    /// Failures after which the address is refused with 421 …
    pub lockout_after: u32,
    /// … for this long.
    pub lockout_duration: HumanDuration,
    /// Password checks (argon2id, 19 MiB and ~50 ms each) running at once;
    /// about the number of cores, so a burst of AUTH costs bounded memory.
    pub max_parallel_checks: usize,
    /// How long a login waits for its turn (a free check, and its place
    /// among the checks one address may have running) before getting 454.
    pub check_wait: HumanDuration,
    pub password_policy: PasswordPolicyConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            sender_login_match: true,
            require_app_passwords: false,
            slowdown_after: 3,
            slowdown_step: HumanDuration::secs(1),
            lockout_after: 10,
            lockout_duration: HumanDuration::secs(15 * 60),
            max_parallel_checks: std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(2),
            check_wait: HumanDuration::secs(10),
            password_policy: PasswordPolicyConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PasswordPolicyConfig {
    pub min_length: usize,
    pub require_upper: bool,
    pub require_lower: bool,
    pub require_digit: bool,
    pub require_symbol: bool,
    /// zxcvbn score 0..=4; 3 is "safely unguessable: moderate protection
    /// from offline slow-hash scenario", right for argon2id hashes.
    pub min_strength: u8,
}

impl Default for PasswordPolicyConfig {
    fn default() -> Self {
        PasswordPolicyConfig {
            min_length: 12,
            require_upper: true,
            require_lower: true,
            require_digit: true,
            require_symbol: true,
            min_strength: 3,
        }
    }
}

/// A config that cannot be used, with the key it is about.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub key: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub(super) fn at(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            key: Some(key.into()),
            message: message.into(),
        }
    }

    /// `Ok` for no problems, one error as itself, several as one error
    /// that lists each on a line of its own.
    pub(super) fn of_all(mut problems: Vec<ConfigError>) -> Result<(), ConfigError> {
        match problems.len() {
            0 => Ok(()),
            1 => Err(problems.remove(0)),
            count => Err(ConfigError {
                file: None,
                key: None,
                message: format!(
                    "{count} problems:\n{}",
                    problems
                        .iter()
                        .map(|problem| format!("  {problem}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            }),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Where the effective config came from, for logs and `check-config`.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigSource {
    File(PathBuf),
    /// No file was found at any of these.
    BuiltInDefaults {
        looked_at: Vec<PathBuf>,
    },
}

impl ConfigSource {
    /// The one line commands print when they run on the defaults.
    pub fn defaults_notice(&self) -> Option<String> {
        match self {
            ConfigSource::File(_) => None,
            ConfigSource::BuiltInDefaults { looked_at } => Some(format!(
                "no config file ({}, ${CONFIG_ENV} unset); using the built-in defaults",
                looked_at
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::File(path) => write!(f, "{}", path.display()),
            ConfigSource::BuiltInDefaults { .. } => f.write_str("built-in defaults"),
        }
    }
}

impl Config {
    /// The config file to read: `-c FILE`, else `$PETREL_CONFIG`, else
    /// `./petrel.toml`, else `/etc/petrel/petrel.toml`, whichever comes
    /// first. A file named explicitly (`-c` or the variable) must exist;
    /// `Err` lists the places looked at when none was found.
    pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, Vec<PathBuf>> {
        if let Some(path) = explicit {
            return Ok(path.to_path_buf());
        }
        if let Some(path) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(path));
        }
        let candidates = [
            PathBuf::from(LOCAL_CONFIG_FILE),
            PathBuf::from(SYSTEM_CONFIG_FILE),
        ];
        match candidates.iter().find(|path| path.exists()) {
            Some(path) => Ok(path.clone()),
            None => Err(candidates.to_vec()),
        }
    }

    /// The config as [`Config::locate`] finds it, or the built-in defaults
    /// (a safe local demo) when there is no file at all.
    pub fn load(explicit: Option<&Path>) -> Result<(Config, ConfigSource), ConfigError> {
        match Config::locate(explicit) {
            Ok(path) => Config::load_file(&path).map(|config| (config, ConfigSource::File(path))),
            Err(looked_at) => Ok((
                Config::default(),
                ConfigSource::BuiltInDefaults { looked_at },
            )),
        }
    }

    pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
        let with_file = |mut err: ConfigError| {
            err.file = Some(path.to_path_buf());
            err
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            with_file(ConfigError {
                file: None,
                key: None,
                message: format!("cannot read config file: {e}"),
            })
        })?;
        Config::parse(&text).map_err(with_file)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let deserializer = toml::Deserializer::parse(text).map_err(|e| ConfigError {
            file: None,
            key: None,
            message: describe_toml_error(text, &e),
        })?;
        let mut config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            ConfigError {
                file: None,
                key: (path != ".").then_some(path),
                message: describe_toml_error(text, &inner),
            }
        })?;
        config.normalize_and_validate()?;
        Ok(config)
    }

    /// The effective settings as TOML, as `check-config` prints them.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }

    pub fn is_local_domain(&self, domain: &Domain) -> bool {
        self.domains.local.iter().any(|d| domain.eq_ignore_case(d))
    }
}

/// "sha256:AB:CD:…" (as `openssl x509 -fingerprint -sha256` prints it,
/// with or without the prefix and colons) as 32 bytes.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], String> {
    let hex: String = text
        .trim()
        .trim_start_matches("sha256:")
        .trim_start_matches("SHA256:")
        .trim_start_matches("sha256 Fingerprint=")
        .chars()
        .filter(|c| *c != ':')
        .collect();
    let bad =
        || format!("{text:?} is not a SHA-256 fingerprint (64 hex digits, \"sha256:\" optional)");
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (index, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[index * 2..index * 2 + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Splits "host:port" (or "[v6]:port"); the port defaults to 25.
pub fn parse_host_port(text: &str) -> Result<(String, u16), String> {
    let bad = || format!("{text:?} is not host:port");
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(port) => port.parse().map_err(|_| bad())?,
            None if after.is_empty() => 25,
            None => return Err(bad()),
        };
        (host.to_string(), port)
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host.to_string(), port.parse().map_err(|_| bad())?),
            None => (text.to_string(), 25),
        }
    };
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    if host.parse::<std::net::IpAddr>().is_err() && Domain::parse(&host).is_err() {
        return Err(format!("{host:?} is not a host name or IP address"));
    }
    Ok((host, port))
}

/// toml's errors carry a byte span; users want a line number.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end();
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{message} (line {line})")
        }
        None => message.to_string(),
    }
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| Domain::parse(name).is_ok())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_not_only_the_first() {
        // retry_min > retry_max used to hide the rest.
        let error = Config::parse(
            "hostname = \"mx.test\"\n[queue]\nretry_min = \"2h\"\nretry_max = \"1h\"\n\
             [limits]\nmax_sessions = 0\n[delivery]\nworkers = 0\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.starts_with("3 problems:"), "{error}");
        for key in ["queue.retry_min", "limits.max_sessions", "delivery.workers"] {
            assert!(error.contains(&format!("\n  {key}: ")), "{error}");
        }
    }

    fn error_of(text: &str) -> ConfigError {
        Config::parse(text).expect_err("config should be refused")
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.smtp.listen, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(
            config.submission.listen,
            vec!["127.0.0.1:2587".parse().unwrap()]
        );
        assert_eq!(config.smtps.listen, vec!["127.0.0.1:2465".parse().unwrap()]);
        assert_eq!(config.domains.local, vec!["localhost"]);
        assert!(config.relay.trusted_networks.is_empty());
        assert_eq!(config.limits.max_message_size, ByteSize::mib(25));
    }

    #[test]
    fn product_example_parses() {
        let config = Config::parse(
            r#"
hostname = "mail.example.com"
data_dir = "/var/lib/petrel"
[smtp]
listen = ["0.0.0.0:25"]
[submission]
listen = ["0.0.0.0:587"]
[smtps]
listen = ["0.0.0.0:465"]
[tls]
cert = "/etc/letsencrypt/live/mail.example.com/fullchain.pem"
key  = "/etc/letsencrypt/live/mail.example.com/privkey.pem"
[domains]
local = ["Example.COM"]
[aliases]
"postmaster@example.com" = "alice@example.com"
"team@example.com" = ["alice@example.com", "bob@elsewhere.org"]
[relay]
trusted_networks = ["127.0.0.0/8", "10.0.0.0/8"]
[delivery]
smarthost = "smtp.provider.net:587"
smarthost_user = "me"
smarthost_password_file = "/etc/petrel/smarthost.pass"
smarthost_tls = "verify"
smarthost_ca = "/etc/petrel/ca.pem"
port = 25
[dns]
nameservers = ["127.0.0.1:5353"]
[queue]
max_age = "5d"
retry_min = "5m"
retry_max = "1h"
[limits]
max_message_size = "25MiB"
max_recipients = 100
max_sessions = 256
max_sessions_per_ip = 20
"#,
        )
        .unwrap();
        assert_eq!(config.domains.local, vec!["example.com"]);
        assert_eq!(config.aliases.len(), 2);
        assert!(config.relay.is_trusted("10.1.2.3".parse().unwrap()));
        assert!(config.relay.is_trusted("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!config.relay.is_trusted("192.168.1.1".parse().unwrap()));
        // What check-config prints parses back to the same config.
        assert_eq!(Config::parse(&config.to_toml()).unwrap(), config);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("bogus = 1", None, "unknown field"),
            (
                "[limits]\nmax_sesions = 3",
                Some("limits.max_sesions"),
                "unknown field",
            ),
            (
                "[queue]\nmax_age = \"5x\"",
                Some("queue.max_age"),
                "invalid duration",
            ),
            (
                "[limits]\nmax_message_size = \"lots\"",
                Some("limits.max_message_size"),
                "invalid size",
            ),
            (
                "[smtp]\nlisten = [\"nowhere\"]",
                Some("smtp.listen[0]"),
                "socket address",
            ),
            (
                "[relay]\ntrusted_networks = [\"10.0.0.0/99\"]",
                Some("relay.trusted_networks[0]"),
                "",
            ),
            (
                "[queue]\nretry_min = \"2h\"",
                Some("queue.retry_min"),
                "more than",
            ),
            (
                "[domains]\nlocal = [\"bad domain\"]",
                Some("domains.local[0]"),
                "",
            ),
            (
                "[aliases]\n\"x@elsewhere.org\" = \"a@localhost\"",
                Some("aliases.\"x@elsewhere.org\""),
                "local",
            ),
            ("[tls]\ncert = \"/x.pem\"", Some("tls.key"), ""),
            (
                "[limits]\nmax_sessions = 0",
                Some("limits.max_sessions"),
                "at least 1",
            ),
        ];
        for (text, key, fragment) in cases {
            let error = error_of(text);
            if let Some(key) = key {
                assert_eq!(error.key.as_deref(), Some(key), "{text}: {error}");
            }
            assert!(error.to_string().contains(fragment), "{text}: {error}");
        }
        assert!(error_of("bogus = 1").to_string().contains("bogus"));
    }

    #[test]
    fn line_numbers_point_at_the_problem() {
        let error = error_of("hostname = \"a.example\"\n\n[queue]\nmax_age = \"5x\"\n");
        assert!(error.message.contains("line 4"), "{error}");
    }

    #[test]
    fn host_port_parsing() {
        assert_eq!(
            parse_host_port("smtp.example.net:587").unwrap(),
            ("smtp.example.net".into(), 587)
        );
        assert_eq!(
            parse_host_port("relay.example.net").unwrap(),
            ("relay.example.net".into(), 25)
        );
        assert_eq!(parse_host_port("[::1]:2525").unwrap(), ("::1".into(), 2525));
        assert_eq!(
            parse_host_port("127.0.0.1:2525").unwrap(),
            ("127.0.0.1".into(), 2525)
        );
        assert!(parse_host_port(":25").is_err());
        assert!(parse_host_port("host:port").is_err());
    }
}
