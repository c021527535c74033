// `--compress auto|zstd|off`, shared by `seeder serve`, `leecher pull` and
// `hub serve` (Protocols/wire.md § 5.4, docs/user-guide.md § Compression).
import ArgumentParser
import FerryMigration

extension CompressionMode: ExpressibleByArgument {}

public struct CompressOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp(
        "Record compression: off (default: compressed sizes would reveal something about the memory to whoever watches the link), "
            + "auto (zstd only while the link is slower than the compressor) or zstd (always). Both sides must allow it; off on either side wins.",
        valueName: "auto|zstd|off"))
    public var compress: CompressionMode = .off

    public init() {}

    /// Secure-channel options with this side's compression offer.
    public var channelOptions: SecureChannelOptions {
        var o = SecureChannelOptions()
        o.compression = compress
        return o
    }
}
