//! Errors that are a sentence for the operator and nothing more. Each part
//! of petrel keeps its own type (so signatures say where a failure comes
//! from); this macro writes the identical impls once.

/// `message_error!(Name, "doc")` defines `pub struct Name(pub String)`
/// with `Display` (the message) and `std::error::Error`.
macro_rules! message_error {
    ($name:ident, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug)]
        pub struct $name(pub String);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::error::Error for $name {}
    };
}

pub(crate) use message_error;
