//! `cargo fuzz run control_request`: the checks are [`smtpguard_fuzz::control_request`].
#![no_main]

libfuzzer_sys::fuzz_target!(|input: smtpguard_fuzz::control_request::Input| {
    smtpguard_fuzz::control_request::check(&input);
});
