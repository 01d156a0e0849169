//! `cargo fuzz run smtp_command`: the checks are [`smtpguard_fuzz::smtp_command`].
#![no_main]

libfuzzer_sys::fuzz_target!(|input: smtpguard_fuzz::smtp_command::Input| {
    smtpguard_fuzz::smtp_command::check(&input);
});
