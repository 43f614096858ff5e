//! Any bytes handed to the record codec decode to a record or to an error: never a panic, an
//! abort or an allocation the input did not pay for.
#![no_main]

use chatq::store::codec;
use chatq::store::{Interaction, Job};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(job) = codec::decode::<Job>(data) {
        // What decodes must encode back to bytes that decode and re-encode identically
        // (compared as bytes: a NaN temperature is not equal to itself).
        let again = codec::encode(&job).expect("a decoded job encodes");
        let twice = codec::decode::<Job>(&again).expect("and decodes again");
        assert_eq!(codec::encode(&twice).expect("and encodes again"), again);
    }
    let _ = codec::decode::<Interaction>(data);
});
