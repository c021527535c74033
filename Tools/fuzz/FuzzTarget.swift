// libFuzzer entry point over the wire's parsers (see Tests/FerryWireTests/WireFuzz.swift).
// Built by Tools/fuzz.sh together with the FerryWire sources it needs, as one module.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    let bytes = size > 0 && data != nil ? Array(UnsafeBufferPointer(start: data, count: size)) : []
    WireFuzz.run(bytes)
    return 0
}
