//! The header fields a session puts before a message: its Received
//! trace field (RFC 5321 4.4) and, on our own users' ways in, what their
//! program left out.

use std::time::SystemTime;

use super::{DataSummary, Kinds, ListenerKind, Session, Transaction};
use crate::protocol::date::rfc5322_date;

impl<K: Kinds> Session<K> {
    /// What goes before the message: our Received field and, on the ways
    /// in of our own users, what their program left out. RFC 6409 8.1,
    /// 8.3: a submission server may add it (the same as `petrel sendmail`
    /// adds). The MX port never rewrites a message.
    pub(super) fn added_header(
        &self,
        id: &str,
        transaction: &Transaction<K>,
        message: &DataSummary,
        now: SystemTime,
    ) -> Vec<u8> {
        let mut header = self.received_header(id, transaction, now);
        if self.config.listener.is_submission() {
            if self.config.listener == ListenerKind::Local
                && !message.headers.has_from
                && let Some(sender) = transaction.sender.address()
            {
                // Postfix's cleanup does so for local submissions.
                header.push_str(&format!("From: <{sender}>\r\n"));
            }
            if !message.headers.has_date {
                header.push_str(&format!("Date: {}\r\n", rfc5322_date(now)));
            }
            if !message.headers.has_message_id {
                header.push_str(&format!("Message-ID: <{id}@{}>\r\n", self.config.hostname));
            }
        }
        header.into_bytes()
    }

    fn received_header(&self, id: &str, transaction: &Transaction<K>, now: SystemTime) -> String {
        if let Some(local) = &self.local {
            // As Postfix's pickup: who on this host, not a network peer.
            return format!(
                "Received: by {} (petrel, from userid {}) id {id}; {}\r\n",
                self.config.hostname,
                local.uid,
                rfc5322_date(now)
            );
        }
        // RFC 3848 / RFC 6531 3.7.3 protocol names.
        let mut protocol = String::from(if transaction.params.smtputf8 {
            "UTF8SMTP"
        } else if self.esmtp {
            "ESMTP"
        } else {
            "SMTP"
        });
        if self.esmtp || transaction.params.smtputf8 {
            if self.tls.is_some() {
                protocol.push('S');
            }
            if self.user.is_some() {
                protocol.push('A');
            }
        }
        let helo = self.helo.as_deref().unwrap_or("unknown");
        let mut header = format!(
            "Received: from {helo} ({}[{}])\r\n\tby {} (petrel) with {protocol} id {id}",
            self.client_name
                .as_deref()
                .map(|name| format!("{name} "))
                .unwrap_or_default(),
            self.client_ip,
            self.config.hostname
        );
        if let Some(tls) = &self.tls {
            header.push_str(&format!(
                "\r\n\t(using {} with cipher {})",
                tls.version, tls.cipher
            ));
        }
        // Which login sent it, and from which device: a leaked app
        // password shows in the mail it sent.
        if let Some(user) = &self.user {
            header.push_str(&format!("\r\n\t(Authenticated sender: {user}"));
            if let Some(label) = &self.app_password {
                header.push_str(&format!(", app password {label}"));
            }
            header.push(')');
        }
        // Naming the recipient only when there is one keeps Bcc private.
        if let [only] = transaction.recipients.as_slice() {
            header.push_str(&format!("\r\n\tfor <{}>", only.envelope));
        }
        header.push_str(&format!("; {}\r\n", rfc5322_date(now)));
        header
    }
}
