//! `cargo fuzz run session_feed`: the checks are [`smtpguard_fuzz::session_feed`];
//! the input is a 12-byte header and the client's bytes
//! ([`smtpguard_fuzz::session_feed::Input::from_bytes`]), so seeds are
//! plain SMTP transcripts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(input) = smtpguard_fuzz::session_feed::Input::from_bytes(data) {
        smtpguard_fuzz::session_feed::check(&input);
    }
});
