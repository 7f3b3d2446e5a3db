//! SASL PLAIN (RFC 4616) and LOGIN as SMTP AUTH carries them (RFC 4954):
//! what the client's base64 responses say, without IO and without a
//! decision (the session asks its services whether the password is right).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

/// Where an AUTH exchange stands: what the next response from the client
/// answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exchange {
    /// PLAIN's one response: authzid NUL authcid NUL password.
    PlainResponse,
    /// LOGIN asked for the user name ...
    LoginUsername,
    /// ... and then for the password.
    LoginPassword { username: String },
}

/// LOGIN's challenges, base64 as sent.
pub const USERNAME_CHALLENGE: &str = "VXNlcm5hbWU6";
pub const PASSWORD_CHALLENGE: &str = "UGFzc3dvcmQ6";

/// What one response amounts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `*`: the client gave up.
    Cancelled,
    /// Not base64, not UTF-8, or not the shape the mechanism has.
    Malformed,
    /// PLAIN with an authorization identity other than the user: acting
    /// as someone else is not offered.
    ActingAsOther,
    /// Ask this next (LOGIN's password).
    Challenge(Exchange, &'static str),
    /// A user name and password to check.
    Credentials { username: String, password: String },
}

/// The exchange an AUTH command opens: `None` for a mechanism not offered.
pub fn start(mechanism: &str) -> Option<(Exchange, &'static str)> {
    match mechanism {
        "PLAIN" => Some((Exchange::PlainResponse, "")),
        "LOGIN" => Some((Exchange::LoginUsername, USERNAME_CHALLENGE)),
        _ => None,
    }
}

/// Decodes the client's `line` in `exchange`.
pub fn respond(exchange: Exchange, line: &[u8]) -> Response {
    if line == b"*" {
        return Response::Cancelled;
    }
    // RFC 4954 4: "=" is an empty initial response.
    let decoded = if line == b"=" {
        Vec::new()
    } else {
        match BASE64.decode(line) {
            Ok(decoded) => decoded,
            Err(_) => return Response::Malformed,
        }
    };
    let Ok(decoded) = String::from_utf8(decoded) else {
        return Response::Malformed;
    };
    match exchange {
        Exchange::PlainResponse => {
            let mut parts = decoded.split('\0');
            let (Some(authzid), Some(username), Some(password), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Response::Malformed;
            };
            if !authzid.is_empty() && authzid != username {
                return Response::ActingAsOther;
            }
            Response::Credentials {
                username: username.to_string(),
                password: password.to_string(),
            }
        }
        Exchange::LoginUsername => Response::Challenge(
            Exchange::LoginPassword { username: decoded },
            PASSWORD_CHALLENGE,
        ),
        Exchange::LoginPassword { username } => Response::Credentials {
            username,
            password: decoded,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(user: &str, password: &str) -> Response {
        Response::Credentials {
            username: user.into(),
            password: password.into(),
        }
    }

    #[test]
    fn plain_and_login_responses() {
        let plain = |text: &str| respond(Exchange::PlainResponse, BASE64.encode(text).as_bytes());
        assert_eq!(plain("\0alice\0secret"), credentials("alice", "secret"));
        assert_eq!(
            plain("alice\0alice\0secret"),
            credentials("alice", "secret")
        );
        assert_eq!(plain("bob\0alice\0secret"), Response::ActingAsOther);
        assert_eq!(plain("\0alice"), Response::Malformed);
        assert_eq!(plain("\0a\0b\0c"), Response::Malformed);
        assert_eq!(respond(Exchange::PlainResponse, b"*"), Response::Cancelled);
        assert_eq!(respond(Exchange::PlainResponse, b"!!"), Response::Malformed);
        assert_eq!(
            respond(
                Exchange::PlainResponse,
                BASE64.encode([0xff, 0, 0]).as_bytes()
            ),
            Response::Malformed
        );
        assert_eq!(respond(Exchange::PlainResponse, b"="), Response::Malformed);
        let Response::Challenge(next, challenge) =
            respond(Exchange::LoginUsername, BASE64.encode("alice").as_bytes())
        else {
            panic!("LOGIN asks for the password");
        };
        assert_eq!(challenge, PASSWORD_CHALLENGE);
        assert_eq!(
            respond(next, BASE64.encode("secret").as_bytes()),
            credentials("alice", "secret")
        );
        assert_eq!(start("CRAM-MD5"), None);
    }
}
