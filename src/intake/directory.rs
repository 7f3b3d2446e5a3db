//! The session's window on the rest of the server: gathers the facts a
//! decision needs (config, accounts, DNS, the brute-force limiter), asks
//! [`crate::routing`] where a recipient goes and [`crate::policy`] whether
//! the client may send there.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::auth::accounts::{Credentials, Lockout, LoginEvent, LoginLog};
use crate::auth::hashing::{Busy, HashingPool};
use crate::auth::limiter::LoginAttempt;
use crate::auth::{Accounts, AuthLimiter, FailureOutcome, Refused, app_passwords};
use crate::config::Config;
use crate::dns::{Dns, DnsFailure};
use crate::envelope::{Recipient, Route};
use crate::host::assigned_here;
use crate::mailauth::{self, MessageVerdict, spf::SpfVerdict};
use crate::policy::outbound::OutboundPolicy;
use crate::policy::{self, DomainStatus, RecipientDecision, RecipientFacts, SenderFacts};
use crate::printable::escape;
use crate::protocol::address::{Address, Domain, ReversePath};
use crate::protocol::reply::{self, Reply};
use crate::protocol::session::{
    AuthVerdict, ClientView, FromOwner, Kinds, SenderStanding, Services, Target,
};
use crate::routing::{self, RouteError};

/// What petrel's sessions carry for it: recipients as routing decided
/// them, and SPF's verdict on the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail;

impl Kinds for Mail {
    type Target = Recipient;
    type Verdict = SpfVerdict;
}

impl Target for Recipient {
    fn address(&self) -> &str {
        &self.address
    }

    fn local_mailbox(&self) -> Option<&str> {
        match &self.route {
            Route::Local { mailbox } => Some(mailbox),
            _ => None,
        }
    }
}

pub struct Directory {
    config: Arc<Config>,
    /// The config routing reads: `config` with the aliases of the last
    /// reload (`newaliases`), swapped whole so a lookup sees one table.
    routing: std::sync::RwLock<Arc<Config>>,
    accounts: Accounts,
    /// Shared with the control socket (`petrel user unlock`).
    limiter: Arc<AuthLimiter>,
    /// Where logins are recorded (`petrel user list` shows them).
    logins: Option<LoginLog>,
    /// Password checks: a bounded number at once.
    hashing: HashingPool,
    /// Address verification; without it domains are not checked.
    dns: Option<Arc<Dns>>,
    /// Where delivery may connect: a domain whose mail hosts are all
    /// outside it can never be delivered to, nor receive a bounce.
    outbound: OutboundPolicy,
    /// The last free-space verdict and when it was reached.
    room: Mutex<Option<(Instant, bool)>>,
}

/// How long a free-space verdict stands. Asked at every MAIL FROM, the
/// filesystem was one system call (and a path walk) per message; a disk
/// that fills within this time still fails the commit, with a 4xx.
const ROOM_CHECK_INTERVAL: Duration = Duration::from_secs(1);

impl Directory {
    pub fn new(
        config: Arc<Config>,
        accounts: Accounts,
        dns: Option<Arc<Dns>>,
        outbound: OutboundPolicy,
        logins: Option<LoginLog>,
    ) -> Directory {
        let limiter = Arc::new(AuthLimiter::new(&config.auth));
        restore_lockouts(&limiter, &accounts);
        let hashing = HashingPool::new(config.auth.max_parallel_checks);
        Directory {
            routing: std::sync::RwLock::new(Arc::clone(&config)),
            config,
            accounts,
            limiter,
            logins,
            hashing,
            dns,
            outbound,
            room: Mutex::new(None),
        }
    }

    /// SPF's verdict from MAIL FROM, DKIM and DMARC for the complete
    /// message (`message`: as received). `None` when there is no DNS.
    pub fn check_message(
        &self,
        spf: &SpfVerdict,
        message: &mut dyn std::io::Read,
    ) -> Option<std::io::Result<MessageVerdict>> {
        let dns = self.dns.as_ref()?;
        Some(mailauth::check_message(
            dns.as_ref(),
            &self.config.mail_auth,
            &self.config.hostname,
            spf,
            message,
            self.config.limits.max_header_size.bytes() as usize,
        ))
    }

    /// The config with the current aliases, for routing.
    fn routing_config(&self) -> Arc<Config> {
        Arc::clone(
            &self
                .routing
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// The routes of a recipient a content filter added: resolved as any
    /// recipient (aliases expanded, local mailboxes checked), without the
    /// relay policy (the filter is trusted).
    pub fn route_added(&self, address: &Address) -> Result<Vec<Recipient>, String> {
        routing::resolve(&self.routing_config(), &self.accounts, address)
            .map(|resolution| resolution.targets)
            .map_err(|error| error.to_string())
    }

    /// `newaliases`: routing uses these aliases from the next lookup on.
    /// (Routes already stored with queued mail stay as they were decided.)
    pub fn replace_aliases(
        &self,
        aliases: std::collections::BTreeMap<String, crate::config::AliasTargets>,
    ) {
        let mut routing = self
            .routing
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut config = Config::clone(&routing);
        config.aliases = aliases;
        *routing = Arc::new(config);
    }

    /// The brute-force limiter, for the control socket's `unlock`.
    pub fn auth_limiter(&self) -> Arc<AuthLimiter> {
        Arc::clone(&self.limiter)
    }

    /// Writes down lockouts the limiter just began, so `petrel user list`
    /// shows them and a restart keeps them.
    fn record_new_lockouts(&self) {
        let Some(logins) = &self.logins else {
            return;
        };
        for lockout in self.limiter.take_new_lockouts() {
            let until = std::time::SystemTime::now() + lockout.duration;
            logins.record(LoginEvent::LockedOut(Lockout {
                client: lockout.client.to_string(),
                account: lockout.account,
                until: crate::timefmt::sql_timestamp(until),
            }));
        }
    }

    /// Does the domain accept mail, and (when `reachable` matters: MX
    /// delivery, bounces) is one of its mail hosts at an address delivery
    /// may connect to? An address literal is judged by the same rule.
    fn domain_status(&self, domain: &Domain, reachable: bool) -> DomainStatus {
        let port = self.config.delivery.port;
        let allowed = |ip: &IpAddr| {
            !reachable
                || self
                    .outbound
                    .check(SocketAddr::new(*ip, port), assigned_here)
                    .is_ok()
        };
        if let Some(ip) = domain.literal_ip() {
            return if allowed(&ip) {
                DomainStatus::Exists
            } else {
                DomainStatus::Unreachable
            };
        }
        let Some(dns) = &self.dns else {
            return DomainStatus::NotChecked;
        };
        match dns.mail_addresses(domain.as_str()) {
            Ok(addresses) if addresses.iter().any(allowed) => DomainStatus::Exists,
            Ok(_) => DomainStatus::Unreachable,
            Err(DnsFailure::NoSuchDomain | DnsFailure::NoMailHosts) => DomainStatus::DoesNotExist,
            Err(DnsFailure::NullMx) => DomainStatus::NullMx,
            Err(DnsFailure::Temporary(_)) => DomainStatus::TemporaryFailure,
        }
    }

    pub fn accounts(&self) -> &Accounts {
        &self.accounts
    }

    /// Whether `address` belongs to `owner`: a local user's own address,
    /// or an account's address and the aliases that lead to it.
    pub fn owns(&self, owner: &FromOwner, address: &Address) -> bool {
        let key = address.mailbox_key();
        if key == owner.login {
            return true;
        }
        !owner.local
            && routing::expand_alias(&self.routing_config(), address)
                .ok()
                .flatten()
                .is_some_and(|targets| targets.iter().any(|t| t.mailbox_key() == owner.login))
    }

    /// The client's forward-confirmed reverse DNS name, if any.
    pub fn client_name(&self, ip: IpAddr) -> Option<String> {
        self.dns.as_ref().and_then(|dns| dns.client_name(ip))
    }

    pub fn password_checks(&self) -> u64 {
        self.hashing.checks()
    }

    fn local_error(&self, what: &str, error: impl std::fmt::Display) -> Reply {
        log::error!("{what}: {error}");
        Reply::new(
            reply::LOCAL_ERROR,
            "Local error in processing, try again later",
        )
    }

    fn check_room(&self) -> bool {
        let floor = self.config.queue.min_free_space.bytes();
        match crate::store::data_dir::free_space(&self.config.data_dir) {
            Ok(free) if free >= floor => true,
            Ok(free) => {
                log::warn!(
                    "queue: only {} MiB free in {} (queue.min_free_space is {}); refusing new mail",
                    free / (1024 * 1024),
                    self.config.data_dir.display(),
                    self.config.queue.min_free_space
                );
                false
            }
            // Cannot tell: let the commit decide rather than refuse all mail.
            Err(_) => true,
        }
    }
}

/// Problems that make mail undeliverable without making the config invalid:
/// `postmaster@` of a local domain that goes nowhere (RFC 5321 4.5.1
/// requires it), and aliases that point at local mailboxes that do not exist.
pub fn deliverability_warnings(
    config: &Config,
    account_exists: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut warnings = Vec::new();
    let deliverable = |address: &Address| {
        let key = address.mailbox_key();
        config.aliases.contains_key(&key) || account_exists(&key)
    };
    for domain in &config.domains.local {
        if let Ok(postmaster) = Address::parse(&format!("postmaster@{domain}"))
            && !deliverable(&postmaster)
        {
            warnings.push(format!(
                "postmaster@{domain} is neither an account nor an alias; RFC 5321 requires it to \
                 be deliverable: add [aliases] \"postmaster@{domain}\" = \"you@{domain}\""
            ));
        }
    }
    for alias in config.aliases.keys() {
        let Ok(address) = Address::parse(alias) else {
            continue;
        };
        match routing::expand_alias(config, &address) {
            Ok(targets) => {
                for target in targets.unwrap_or_default() {
                    if let Route::Local { mailbox } = routing::route_final(config, &target).route
                        && !account_exists(&mailbox)
                    {
                        warnings.push(format!(
                            "alias {alias} leads to {target}, which is not an account; \
                             that target is skipped"
                        ));
                    }
                }
            }
            Err(error) => warnings.push(format!(
                "alias {alias} cannot be expanded ({error}); mail to it is refused"
            )),
        }
    }
    warnings
}

/// Who is logging in, for the log lines.
struct Login<'a> {
    label: String,
    ip: IpAddr,
    mechanism: &'a str,
}

impl Directory {
    /// A turn at the limiter, or why there is none.
    fn begin_login(
        &self,
        login: &Login,
        name: &str,
        account: Option<&str>,
        deadline: Instant,
    ) -> Result<LoginAttempt, AuthVerdict> {
        let Login {
            label, mechanism, ..
        } = login;
        self.limiter
            .begin(login.ip, name, account, deadline)
            .map_err(|refused| match refused {
                Refused::LockedOut => {
                    log::warn!(
                        "warning: {label}: SASL {mechanism} authentication refused: \
                         too many failures from this address"
                    );
                    AuthVerdict::LockedOut
                }
                Refused::Busy => {
                    log::warn!(
                        "warning: {label}: SASL {mechanism} authentication deferred: \
                         too many checks from this address already running"
                    );
                    AuthVerdict::Busy
                }
            })
    }

    /// The stored hash to check against, the app password it belongs to,
    /// and the text to check. Exactly one hash per attempt, of the same
    /// cost whatever was typed (an app password, the main password, a
    /// wrong one, an unknown user): nothing in the timing tells them apart.
    fn what_to_check<'a>(
        &self,
        credentials: Option<&'a Credentials>,
        app_letters: Option<&'a str>,
        password: &'a str,
    ) -> (Option<&'a str>, Option<String>, &'a str) {
        match credentials {
            Some(found) => match (&found.app, app_letters) {
                (Some(app), Some(letters)) => {
                    (Some(app.hash.as_str()), Some(app.label.clone()), letters)
                }
                // The main password may not be used: checked against
                // nothing, at the same cost.
                _ if self.config.auth.require_app_passwords => (None, None, password),
                _ => (Some(found.password_hash.as_str()), None, password),
            },
            None => (None, None, password),
        }
    }

    fn logged_in(
        &self,
        login: &Login,
        key: String,
        found: &Credentials,
        app_label: Option<String>,
    ) -> AuthVerdict {
        let Login {
            label, mechanism, ..
        } = login;
        let with = app_label
            .as_deref()
            .map(|l| format!(" ({l})"))
            .unwrap_or_default();
        log::info!("{label}: SASL {mechanism} authentication succeeded: sasl_username={key}{with}");
        let client_ip = login.ip.to_string();
        if found.failures > 0 && found.last_login_from.as_deref() != Some(&client_ip) {
            log::warn!(
                "warning: {label}: {key} logged in from a new address after {} failed \
                 attempts since the last login (last login from {})",
                found.failures,
                found.last_login_from.as_deref().unwrap_or("nowhere")
            );
        }
        if let Some(logins) = &self.logins {
            logins.record(LoginEvent::Succeeded {
                account: key.clone(),
                client: client_ip,
                label: app_label.clone(),
            });
        }
        AuthVerdict::Success {
            account: key,
            app_password: app_label,
        }
    }

    /// `account`: the existing account the name named, if any.
    fn login_failed(
        &self,
        login: &Login,
        username: &str,
        account: Option<String>,
        outcome: FailureOutcome,
    ) -> AuthVerdict {
        self.record_new_lockouts();
        if let (Some(logins), Some(account)) = (&self.logins, account) {
            logins.record(LoginEvent::Failed {
                account,
                client: login.ip.to_string(),
            });
        }
        let then = match outcome {
            FailureOutcome::Delay(delay) if delay.is_zero() => String::new(),
            FailureOutcome::Delay(delay) => format!(", reply delayed {}s", delay.as_secs()),
            FailureOutcome::LockedOut => ", address now locked out".to_string(),
        };
        // Postfix's wording, which fail2ban's filters match.
        log::warn!(
            "warning: {}: SASL {} authentication failed: sasl_username={}{then}",
            login.label,
            login.mechanism,
            escape(username)
        );
        match outcome {
            FailureOutcome::Delay(delay) => AuthVerdict::Failure { delay },
            FailureOutcome::LockedOut => AuthVerdict::LockedOut,
        }
    }
}

impl Services<Mail> for Directory {
    fn check_sender(
        &self,
        client: &ClientView,
        sender: &ReversePath,
    ) -> Result<SenderStanding<Mail>, Reply> {
        if let Some(local) = client.local {
            return policy::decide_local_sender(local, sender).map(|()| SenderStanding {
                accountable: true,
                spf: None,
                from_owner: (!local.trusted).then(|| FromOwner {
                    login: local.address.to_lowercase(),
                    local: true,
                }),
            });
        }
        let address = sender.address();
        let trusted_network = self.config.relay.is_trusted(client.ip);
        let from_owner = client.user.map(|user| FromOwner {
            login: user.to_string(),
            local: false,
        });
        let owned_by_user = match (&from_owner, address) {
            (Some(owner), Some(address)) => self.owns(owner, address),
            _ => false,
        };
        let mut facts = SenderFacts {
            null_sender: address.is_none(),
            authenticated_as: client.user.map(str::to_string),
            owned_by_user,
            login_must_match: self.config.auth.sender_login_match,
            trusted_network,
            local_domain: address.is_some_and(|a| self.config.is_local_domain(a.domain())),
            domain: DomainStatus::NotChecked,
        };
        if let Some(address) = address
            && policy::sender_needs_dns(&facts)
        {
            // Bounces go to the sender: it must be a place we could deliver to.
            facts.domain = self.domain_status(address.domain(), true);
        }
        policy::decide_sender(&facts)?;
        let spf = match &self.dns {
            Some(dns) if mailauth::applies(&self.config, client) => {
                let sender = address.map(|a| a.to_string()).unwrap_or_default();
                Some(mailauth::check_sender(dns.as_ref(), client, &sender))
            }
            _ => None,
        };
        Ok(SenderStanding {
            accountable: client.user.is_some() || trusted_network,
            spf,
            from_owner,
        })
    }

    fn check_recipient(
        &self,
        client: &ClientView,
        recipient: &Address,
    ) -> Result<Vec<Recipient>, Reply> {
        let resolution = routing::resolve(&self.routing_config(), &self.accounts, recipient);
        let (local_domain, mailbox_exists) = match &resolution {
            Ok(resolution) => (resolution.local_domain, resolution.local_domain),
            Err(RouteError::NoSuchMailbox) => (true, false),
            Err(RouteError::Unavailable(error)) => {
                return Err(self.local_error("recipient lookup", error));
            }
            Err(error @ (RouteError::AliasTooDeep | RouteError::TooManyTargets)) => {
                log::error!(
                    "alias {} cannot be expanded ({error}); fix [aliases]",
                    recipient.mailbox_key()
                );
                return Err(Reply::new(
                    reply::ALIAS_LOOP,
                    "Recipient address rejected: alias expansion failed (loop or too many targets)",
                ));
            }
        };
        let by_mx = matches!(
            routing::remote_route(&self.config, ""),
            Route::Remote { .. }
        );
        let mut facts = RecipientFacts {
            local_domain,
            mailbox_exists,
            authenticated: client.user.is_some(),
            trusted_network: self.config.relay.is_trusted(client.ip),
            by_smarthost: !by_mx,
            domain: DomainStatus::NotChecked,
        };
        if policy::recipient_needs_dns(&facts) {
            facts.domain = self.domain_status(recipient.domain(), true);
        }
        match (policy::decide_recipient(&facts), resolution) {
            (RecipientDecision::Refuse(reply), _) => Err(reply),
            (_, Ok(resolution)) => {
                for skipped in &resolution.skipped {
                    log::warn!(
                        "alias {}: target {skipped} is not an account; skipped (fix [aliases])",
                        recipient.mailbox_key()
                    );
                }
                Ok(resolution.targets)
            }
            (_, Err(error)) => Err(self.local_error("recipient routing", error)),
        }
    }

    fn authenticate(
        &self,
        client: &ClientView,
        mechanism: &str,
        username: &str,
        password: &str,
    ) -> AuthVerdict {
        let login = Login {
            label: client.label(),
            ip: client.ip,
            mechanism,
        };
        let key = Address::parse(username).map(|a| a.mailbox_key()).ok();
        // Typed in the form of an app password: its selector names the one
        // app password it can be.
        let app_letters = app_passwords::normalize(password);
        let selector = app_letters.as_deref().map(app_passwords::selector);
        let credentials = match &key {
            Some(key) => match self.accounts.credentials(key, selector) {
                Ok(credentials) => credentials,
                Err(error) => {
                    log::error!("auth: {error}");
                    return AuthVerdict::Unavailable;
                }
            },
            None => None,
        };
        let account = key.clone().filter(|_| credentials.is_some());
        // Every name is counted alike, account or not: the slowdown must
        // not tell which names exist.
        let name = key.as_deref().unwrap_or(username);
        // One wait for a turn, at the limiter and then for a check slot.
        let deadline = Instant::now() + self.config.auth.check_wait.get();
        // A locked-out address costs no hash.
        let attempt = match self.begin_login(&login, name, account.as_deref(), deadline) {
            Ok(attempt) => attempt,
            Err(verdict) => return verdict,
        };
        let (stored, app_label, typed) =
            self.what_to_check(credentials.as_ref(), app_letters.as_deref(), password);
        let valid = match self.hashing.verify(typed, stored, deadline) {
            Ok(valid) => valid,
            Err(Busy) => {
                self.limiter.abandoned(attempt);
                log::warn!(
                    "warning: {}: SASL {mechanism} authentication deferred: \
                     {} password checks already running",
                    login.label,
                    self.hashing.size()
                );
                return AuthVerdict::Busy;
            }
        };
        match (valid, key, credentials) {
            (true, Some(key), Some(found)) => {
                self.limiter.succeeded(attempt);
                self.logged_in(&login, key, &found, app_label)
            }
            (_, _, found) => {
                let outcome = self.limiter.failed(attempt);
                self.login_failed(
                    &login,
                    username,
                    account.filter(|_| found.is_some()),
                    outcome,
                )
            }
        }
    }

    fn is_locked_out(&self, ip: IpAddr) -> bool {
        self.limiter.is_locked_out(ip)
    }

    fn login_stands(&self, account: &str, app_password: Option<&str>) -> bool {
        match self.accounts.login_exists(account, app_password) {
            Ok(stands) => {
                if !stands {
                    log::warn!(
                        "warning: {account}: {} was revoked; the session that logged in with it \
                         sends nothing more",
                        app_password.map_or("the account".to_string(), |label| format!(
                            "app password {}",
                            escape(label)
                        ))
                    );
                }
                stands
            }
            // A lookup that failed says nothing about the login; the
            // transaction then fails at its recipients' lookups anyway.
            Err(error) => {
                log::error!("auth: {error}");
                true
            }
        }
    }

    fn has_room(&self) -> bool {
        let mut room = self.room.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        match *room {
            Some((checked, verdict)) if now.duration_since(checked) < ROOM_CHECK_INTERVAL => {
                verdict
            }
            _ => {
                let verdict = self.check_room();
                *room = Some((now, verdict));
                verdict
            }
        }
    }
}

/// Lockouts recorded before a restart still hold after it.
fn restore_lockouts(limiter: &AuthLimiter, accounts: &Accounts) {
    let lockouts = match accounts.lockouts() {
        Ok(lockouts) => lockouts,
        Err(error) => {
            log::warn!("auth: cannot read recorded lockouts: {error}");
            return;
        }
    };
    let now = std::time::SystemTime::now();
    for lockout in lockouts {
        let (Ok(client), Some(until)) = (
            lockout.client.parse::<IpAddr>(),
            crate::timefmt::parse_sql_timestamp(&lockout.until),
        ) else {
            continue;
        };
        if let Ok(remaining) = until.duration_since(now) {
            limiter.restore_lockout(client, lockout.account.as_deref(), remaining);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with(aliases: &str) -> Config {
        Config::parse(&format!(
            "[domains]\nlocal = [\"example.com\"]\n[aliases]\n{aliases}"
        ))
        .unwrap()
    }

    #[test]
    fn warnings_for_undeliverable_postmaster_and_aliases() {
        let config =
            config_with("\"team@example.com\" = [\"alice@example.com\", \"ghost@example.com\"]\n");
        let warnings = deliverability_warnings(&config, |address| address == "alice@example.com");
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("postmaster@example.com"));
        assert!(warnings[1].contains("ghost@example.com"));
        let fixed = config_with("\"postmaster@example.com\" = \"Alice@example.com\"\n");
        assert!(deliverability_warnings(&fixed, |a| a == "alice@example.com").is_empty());
    }
}
