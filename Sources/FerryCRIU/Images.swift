// CRIU's image directory as Ferry handles it: packed into one byte string to
// travel over Ferry's encrypted session (Protocols/criu.md § 3), unpacked on
// the other side, and the pagemap read to learn which pages CRIU left lazy.
import Foundation
import FerryToolkit

public enum CriuImages {
    /// Bytes a bundle may hold: CRIU's images without the lazy memory are
    /// small (descriptors, registers, the pages it could not leave lazy).
    public static let maxBundleBytes = 1 << 30
    static let magic: [UInt8] = Array("FCI1".utf8)

    /// Every regular file of `directory` whose name ends in .img.
    public static func pack(directory: String) throws -> [UInt8] {
        var out = magic
        let names = try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasSuffix(".img") }.sorted()
        append(UInt32(names.count), to: &out)
        for name in names {
            let data = try Data(contentsOf: URL(fileURLWithPath: directory + "/" + name))
            let utf8 = Array(name.utf8)
            append(UInt32(utf8.count), to: &out)
            out += utf8
            append(UInt64(data.count), to: &out)
            out += data
            guard out.count <= maxBundleBytes else { throw CriuError.badImages("more than \(maxBundleBytes >> 20) MiB of images in \(directory)") }
        }
        return out
    }

    /// Writes the files of a bundle into `directory`; returns their names.
    @discardableResult
    public static func unpack(_ bytes: [UInt8], into directory: String) throws -> [String] {
        var cursor = 0
        func take(_ count: Int) throws -> ArraySlice<UInt8> {
            guard count >= 0, bytes.count - cursor >= count else { throw CriuError.badImages("the bundle is cut short") }
            defer { cursor += count }
            return bytes[cursor..<cursor + count]
        }
        func integer<T: FixedWidthInteger>(_: T.Type) throws -> T {
            try take(MemoryLayout<T>.size).reversed().reduce(T(0)) { $0 << 8 | T($1) }
        }
        guard Array(try take(4)) == magic else { throw CriuError.badImages("not a Ferry image bundle") }
        let count = try integer(UInt32.self)
        var names: [String] = []
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        for _ in 0..<count {
            let length = Int(try integer(UInt32.self))
            guard length <= 255 else { throw CriuError.badImages("a file name of \(length) bytes") }
            let name = String(decoding: try take(length), as: UTF8.self)
            guard name.hasSuffix(".img"), !name.contains("/"), !name.hasPrefix(".") else {
                throw CriuError.badImages("refusing the file name '\(name)'")
            }
            let size = try integer(UInt64.self)
            guard size <= UInt64(maxBundleBytes) else { throw CriuError.badImages("\(name) claims \(size) bytes") }
            let data = Data(try take(Int(size)))
            try data.write(to: URL(fileURLWithPath: directory + "/" + name))
            names.append(name)
        }
        guard cursor == bytes.count else { throw CriuError.badImages("bytes after the last file") }
        return names
    }

    private static func append<T: FixedWidthInteger>(_ value: T, to out: inout [UInt8]) {
        withUnsafeBytes(of: value.littleEndian) { out += $0 }
    }

    /// The pages CRIU left lazy for each process of the dump: pagemap-PID.img
    /// entries flagged PE_LAZY (images/pagemap.proto), keyed by PID.
    public static func lazyRanges(directory: String) throws -> [UInt64: [(start: UInt64, pages: UInt64)]] {
        var result: [UInt64: [(start: UInt64, pages: UInt64)]] = [:]
        for name in try FileManager.default.contentsOfDirectory(atPath: directory)
        where name.hasPrefix("pagemap-") && name.hasSuffix(".img") && !name.hasPrefix("pagemap-shmem") {
            guard let pid = UInt64(name.dropFirst("pagemap-".count).dropLast(".img".count)) else { continue }
            let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: directory + "/" + name)))
            result[pid] = try lazyEntries(bytes, name: name)
        }
        return result
    }

    /// The PE_LAZY entries of a pagemap image (its first record is
    /// pagemap_head).
    static func lazyEntries(_ bytes: [UInt8], name: String) throws -> [(start: UInt64, pages: UInt64)] {
        try CriuImageRecords.records(bytes, name: name).dropFirst().compactMap { record in
            let entry = try CriuImageRecords.pagemapEntry(record, name: name)
            return UInt32(truncatingIfNeeded: entry.flags) & PagemapFlag.lazy != 0 ? (entry.vaddr, entry.pages) : nil
        }
    }
}
