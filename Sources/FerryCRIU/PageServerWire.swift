// CRIU's page-server protocol, the part Ferry speaks (criu/page-xfer.c;
// Protocols/criu.md § 4). A request or reply header is CRIU's
// `struct page_server_iov` as the C compiler lays it out on x86-64: since
// CRIU 4.2, 32 bytes, little-endian, with 4 bytes of padding after `cmd`.
//
//   offset 0  u32 cmd       low 16 bits the command, high 16 bits PE_* flags
//   offset 4  u32 padding   (zero when we write it, ignored when read)
//   offset 8  u64 nr_pages
//   offset 16 u64 vaddr
//   offset 24 u64 dst_id    in PS_IOV_GET and its reply: the process's pid
//                           in the dump (other commands: (id << 8) | type)
//
// CRIU 4.1 has `u32 nr_pages` and no padding: 24 bytes (cmd, nr_pages,
// vaddr at 8, dst_id at 16). A header of the other size is a protocol
// error to CRIU (it reads the rest as data), so the size follows the
// version of the criu at the other end.
import FerryToolkit

public enum PageServerCommand: UInt32, Sendable {
    case add = 1
    case hole = 2
    case open = 3
    case open2 = 4
    case parent = 5
    case addFlagged = 6
    case get = 7
    case close = 0x1023
    case forceClose = 0x1024
}

/// Pagemap entry flags (criu/include/pagemap.h).
public enum PagemapFlag {
    public static let parent: UInt32 = 1 << 0
    public static let lazy: UInt32 = 1 << 1
    public static let present: UInt32 = 1 << 2
}

public struct PageServerHeader: Sendable, Equatable {
    public static let size = 32
    /// dst_id type of a process's private memory.
    public static let typePid: UInt64 = 1

    public var command: UInt32
    public var flags: UInt32
    public var pages: UInt64
    public var address: UInt64
    public var destination: UInt64

    public init(command: PageServerCommand, flags: UInt32 = 0, pages: UInt64 = 0, address: UInt64 = 0,
                destination: UInt64 = 0) {
        self.command = command.rawValue
        self.flags = flags
        self.pages = pages
        self.address = address
        self.destination = destination
    }

    public init(decoding bytes: UnsafeRawBufferPointer) {
        precondition(bytes.count >= Self.size)
        let cmd = bytes.loadUnaligned(fromByteOffset: 0, as: UInt32.self).littleEndian
        command = cmd & 0xFFFF
        flags = cmd >> 16
        pages = bytes.loadUnaligned(fromByteOffset: 8, as: UInt64.self).littleEndian
        address = bytes.loadUnaligned(fromByteOffset: 16, as: UInt64.self).littleEndian
        destination = bytes.loadUnaligned(fromByteOffset: 24, as: UInt64.self).littleEndian
    }

    public var known: PageServerCommand? { PageServerCommand(rawValue: command) }

    /// The header as CRIU 4.2 and later read it (32 bytes), or, with
    /// `narrow`, as CRIU 4.1 does (24 bytes; at most 2^32-1 pages).
    public func encoded(narrow: Bool = false) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: narrow ? Self.narrowSize : Self.size)
        bytes.withUnsafeMutableBytes { raw in
            raw.storeBytes(of: (flags << 16 | command).littleEndian, toByteOffset: 0, as: UInt32.self)
            if narrow {
                raw.storeBytes(of: UInt32(truncatingIfNeeded: pages).littleEndian, toByteOffset: 4, as: UInt32.self)
                raw.storeBytes(of: address.littleEndian, toByteOffset: 8, as: UInt64.self)
                raw.storeBytes(of: destination.littleEndian, toByteOffset: 16, as: UInt64.self)
            } else {
                raw.storeBytes(of: pages.littleEndian, toByteOffset: 8, as: UInt64.self)
                raw.storeBytes(of: address.littleEndian, toByteOffset: 16, as: UInt64.self)
                raw.storeBytes(of: destination.littleEndian, toByteOffset: 24, as: UInt64.self)
            }
        }
        return bytes
    }

    /// CRIU 4.1's header size.
    public static let narrowSize = 24
}
