// CRIU's image files, read and written record by record: two magic words,
// then records of a little-endian u32 size and a protobuf message
// (images/pagemap.proto, mm.proto, vma.proto, core.proto). Only the fields
// Ferry needs are decoded; the others are skipped by wire type.
import Foundation

/// Records and protobuf fields of CRIU's images (CriuImages.lazyRanges,
/// CriuDump.leaveLazy).
enum CriuImageRecords {
    static let pageBytes = 4096

    struct Field {
        let number: UInt64
        /// A varint's value (wire type 0); 0 for other types.
        let value: UInt64
        /// A length-delimited field's bytes (wire type 2).
        let bytes: ArraySlice<UInt8>
    }

    static func records(_ bytes: [UInt8], name: String) throws -> [ArraySlice<UInt8>] {
        guard bytes.count >= 8 else { throw CriuError.badImages("\(name) is cut short") }
        var cursor = 8
        var result: [ArraySlice<UInt8>] = []
        while cursor < bytes.count {
            guard bytes.count - cursor >= 4 else { throw CriuError.badImages("\(name) is cut short") }
            let size = Int(bytes[cursor..<cursor + 4].reversed().reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
            cursor += 4
            guard size <= bytes.count - cursor else { throw CriuError.badImages("\(name) is cut short") }
            result.append(bytes[cursor..<cursor + size])
            cursor += size
        }
        return result
    }

    static func fields(_ message: ArraySlice<UInt8>, name: String) throws -> [Field] {
        var result: [Field] = []
        var at = message.startIndex
        while at < message.endIndex {
            let (key, next) = try varint(message, at, name)
            at = next
            switch key & 7 {
            case 0:
                let (value, after) = try varint(message, at, name)
                result.append(Field(number: key >> 3, value: value, bytes: []))
                at = after
            case 1, 5:
                let size = key & 7 == 1 ? 8 : 4
                guard message.endIndex - at >= size else { throw CriuError.badImages("\(name): a field is cut short") }
                at += size
            case 2:
                let (length, after) = try varint(message, at, name)
                guard length <= UInt64(message.endIndex - after) else { throw CriuError.badImages("\(name): a field is cut short") }
                result.append(Field(number: key >> 3, value: 0, bytes: message[after..<after + Int(length)]))
                at = after + Int(length)
            default:
                throw CriuError.badImages("\(name): unexpected field type \(key & 7)")
            }
        }
        return result
    }

    static func varint(_ bytes: ArraySlice<UInt8>, _ start: Int, _ name: String) throws -> (UInt64, Int) {
        var value: UInt64 = 0
        var shift: UInt64 = 0
        var at = start
        while at < bytes.endIndex, shift < 64 {
            let byte = bytes[at]
            value |= UInt64(byte & 0x7F) << shift
            at += 1
            if byte & 0x80 == 0 { return (value, at) }
            shift += 7
        }
        throw CriuError.badImages("\(name): a malformed varint")
    }

    static func appendVarint(_ value: UInt64, to out: inout [UInt8]) {
        var v = value
        while v >= 0x80 {
            out.append(UInt8(v & 0x7F) | 0x80)
            v >>= 7
        }
        out.append(UInt8(v))
    }

    static func appendRecord(_ message: [UInt8], to out: inout [UInt8]) {
        withUnsafeBytes(of: UInt32(message.count).littleEndian) { out += $0 }
        out += message
    }

    /// The varint fields of a message by number (the last one of a number wins).
    static func varints(_ message: ArraySlice<UInt8>, name: String) throws -> [UInt64: UInt64] {
        var values: [UInt64: UInt64] = [:]
        for field in try fields(message, name: name) where field.bytes.isEmpty { values[field.number] = field.value }
        return values
    }

    /// A pagemap_entry's address, page count (nr_pages, else the older
    /// compat_nr_pages) and flags.
    static func pagemapEntry(_ record: ArraySlice<UInt8>, name: String) throws -> (vaddr: UInt64, pages: UInt64, flags: UInt64) {
        let values = try varints(record, name: name)
        guard let vaddr = values[1] else { throw CriuError.badImages("\(name): an entry without vaddr") }
        return (vaddr, values[5] ?? values[2] ?? 0, values[4] ?? 0)
    }

    /// A pagemap_entry as CRIU writes one: vaddr, compat_nr_pages 0 (a
    /// required field), flags, nr_pages.
    static func pagemapEntry(vaddr: UInt64, pages: UInt64, flags: UInt64) -> [UInt8] {
        var out: [UInt8] = []
        out.append(1 << 3); appendVarint(vaddr, to: &out)
        out.append(2 << 3); appendVarint(0, to: &out)
        out.append(4 << 3); appendVarint(flags, to: &out)
        out.append(5 << 3); appendVarint(pages, to: &out)
        return out
    }

    /// mmap flags and VMA status bits of vma_entry_can_be_lazy()
    /// (criu/include/vma.h, image.h).
    static let mapPrivate: UInt64 = 0x02, mapAnonymous: UInt64 = 0x20, mapLocked: UInt64 = 0x2000, mapHugetlb: UInt64 = 0x40000
    static let areaVsyscall: UInt64 = 1 << 2, areaVdso: UInt64 = 1 << 3, areaVvar: UInt64 = 1 << 12

    /// The pages holding a thread's stack pointer, from every core-*.img of
    /// an x86-64 dump (core_entry.thread_info.gpregs.sp); none for another
    /// architecture.
    static func stackPages(directory: String, names: [String]) throws -> Set<UInt64> {
        var pages = Set<UInt64>()
        for name in names where name.hasPrefix("core-") && name.hasSuffix(".img") {
            let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: directory + "/" + name)))
            guard let core = try records(bytes, name: name).first else { continue }
            let fields = try fields(core, name: name)
            guard fields.first(where: { $0.number == 1 })?.value == 1, // mtype X86_64
                  let thread = fields.first(where: { $0.number == 2 }),
                  let regs = try self.fields(thread.bytes, name: name).first(where: { $0.number == 2 }),
                  let sp = try self.fields(regs.bytes, name: name).first(where: { $0.number == 20 })?.value else { continue }
            pages.insert(sp & ~UInt64(pageBytes - 1))
        }
        return pages
    }

    /// The VMAs of mm-ID.img whose pages CRIU may leave lazy, sorted.
    static func lazyableVMAs(path: String) throws -> [(start: UInt64, end: UInt64)] {
        let name = (path as NSString).lastPathComponent
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        guard let mm = try records(bytes, name: name).first else { throw CriuError.badImages("\(name) is empty") }
        var result: [(start: UInt64, end: UInt64)] = []
        for field in try fields(mm, name: name) where field.number == 14 {
            // vma_entry: start 1, end 2, flags 6, status 7.
            let values = try varints(field.bytes, name: name)
            let (start, end, flags, status) = (values[1] ?? 0, values[2] ?? 0, values[6] ?? 0, values[7] ?? 0)
            guard flags & mapAnonymous != 0, flags & mapPrivate != 0, flags & (mapLocked | mapHugetlb) == 0,
                  status & (areaVsyscall | areaVdso | areaVvar) == 0, start < end else { continue }
            result.append((start, end))
        }
        return result.sorted { $0.start < $1.start }
    }
}
