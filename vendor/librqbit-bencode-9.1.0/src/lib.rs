mod bencode_value;
mod deserialize;
pub mod raw_value;
mod serialize;

pub use bencode_value::*;
pub use deserialize::{
    BencodeDeserializer, DEFAULT_MAX_DEPTH, Error as DeserializeError,
    ErrorWithContext as DeserializeErrorWithContext, WithRawBytes, from_bytes,
    from_bytes_with_rest,
};
pub use serialize::{Error as SerializeError, bencode_serialize_to_writer};

pub use buffers::{ByteBuf, ByteBufOwned};
