// Compares an image with a live (normally stopped) process, region for
// region and byte for byte: the independent check behind `leecher verify`,
// the demo and the end-to-end tests. It trusts nothing the migration wrote
// except the files: it re-reads the process's maps and memory itself.
import Foundation

public struct VerificationReport: Sendable, CustomStringConvertible {
    public var regionsCompared = 0
    public var bytesCompared: UInt64 = 0
    /// One line per difference found, empty when the image matches.
    public var problems: [String] = []

    public var matches: Bool { problems.isEmpty }

    public var description: String {
        if matches {
            return "image matches pid memory: \(regionsCompared) regions, \(bytesCompared) bytes compared"
        }
        return "image differs from the process in \(problems.count) place(s):\n  " + problems.prefix(20).joined(separator: "\n  ")
    }
}

public enum ImageVerifier {
    /// Compares every migrated region of the image at `directory` with the
    /// memory of `pid`, and the set of migratable regions with its maps.
    public static func compare(directory: String, pid: Int32) throws -> VerificationReport {
        let manifest = try Manifest.load(directory: directory)
        let maps = try ProcessMaps.read(pid: pid)
        let reader = try PageReader(pid: pid)
        var report = VerificationReport()

        let imageRanges = manifest.regions.filter { $0.file != nil }.map { AddressRange(start: $0.start, end: $0.end) }
        let processRanges = maps.filter { $0.kind == .migrate }.map(\.range)
        if coverage(imageRanges) != coverage(processRanges) {
            report.problems.append("migratable regions differ: image has \(describe(coverage(imageRanges))), process has \(describe(coverage(processRanges)))")
        }

        // A hugetlb region restored in 4 KiB pages would not be the same memory.
        let processPageSizes = Dictionary(maps.map { ($0.start, $0.pageSize) }, uniquingKeysWith: { first, _ in first })
        for region in manifest.regions where region.file != nil {
            let recorded = region.pageSize ?? manifest.pageSize
            if let actual = processPageSizes[region.start], actual != recorded {
                report.problems.append("region 0x\(String(region.start, radix: 16)) has \(actual >> 10) KiB pages in the process, the image records \(recorded >> 10) KiB")
            }
        }

        let chunk = 1 << 20
        let fromProcess = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        let fromFile = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer {
            fromProcess.deallocate()
            fromFile.deallocate()
        }
        for region in manifest.regions {
            guard let file = region.file else { continue }
            let path = directory + "/" + file
            guard let handle = FileHandle(forReadingAtPath: path) else {
                report.problems.append("cannot open \(path)")
                continue
            }
            defer { try? handle.close() }
            let size = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? UInt64) ?? nil
            guard size == region.end - region.start else {
                report.problems.append("\(file) holds \(size ?? 0) bytes, its region \(region.end - region.start)")
                continue
            }
            report.regionsCompared += 1
            var address = region.start
            while address < region.end {
                let length = Int(min(UInt64(chunk), region.end - address))
                let range = AddressRange(start: address, end: address + UInt64(length))
                let live = UnsafeMutableRawBufferPointer(rebasing: fromProcess[..<length])
                let result = try reader.readReporting([range], into: live)
                // Holes read as nothing in the process (it would get SIGBUS) and as
                // zeros in the file; the reader zero-filled them, so they compare equal.
                let holes = Ranges.merge((region.holes ?? []).compactMap {
                    $0.count == 2 && $0[0] < $0[1] ? AddressRange(start: $0[0], end: $0[1]) : nil
                })
                if !Ranges.subtract(Ranges.merge(result.vanished), holes).isEmpty {
                    report.problems.append("\(result.vanished.map(\.description).joined(separator: ", ")) of the image is not mapped in pid \(pid)")
                    break
                }
                let data = try handle.read(upToCount: length) ?? Data()
                guard data.count == length else {
                    report.problems.append("\(file) ends early at \(range)")
                    break
                }
                data.copyBytes(to: fromFile.baseAddress!.assumingMemoryBound(to: UInt8.self), count: length)
                if memcmp(live.baseAddress!, fromFile.baseAddress!, length) != 0 {
                    var page = 0
                    while page < length {
                        if memcmp(live.baseAddress! + page, fromFile.baseAddress! + page, Int(pageSize)) != 0 {
                            report.problems.append("page 0x\(String(address + UInt64(page), radix: 16)) (\(region.name.isEmpty ? "anonymous" : region.name)) differs")
                            if report.problems.count > 100 { return report }
                        }
                        page += Int(pageSize)
                    }
                }
                report.bytesCompared += UInt64(length)
                address += UInt64(length)
            }
        }
        return report
    }

    /// Merged address coverage, so splits and merges of VMAs do not count as differences.
    static func coverage(_ ranges: [AddressRange]) -> [AddressRange] {
        Ranges.merge(ranges)
    }

    private static func describe(_ ranges: [AddressRange]) -> String {
        ranges.count <= 6 ? ranges.map(\.description).joined(separator: " ") : "\(ranges.count) ranges"
    }
}
