"""The word tables app.data.synthetic invents its names from (people, titles, companies, places, ...).

Kept apart from the generator so the grammar reads on one screen. Order matters: the generator
picks by index from a seeded random.Random, so reordering, adding or removing a word changes every
sample of a seed (tests/data/test_datagen.py and the golden losses depend on them staying the same).
Space-separated strings keep the tables compact.
"""

from __future__ import annotations

W = str.split
SURNAMES = (
    "王李张刘陈杨赵黄周吴徐孙胡朱高林何郭马罗梁宋郑谢韩唐冯董萧程曹袁邓许傅沈曾彭吕苏卢蒋蔡"
    "贾丁魏薛叶余潘杜戴夏钟汪田任姜范方石姚谭廖邹熊金陆孔白崔康毛邱秦江顾侯邵孟龙段雷钱汤尹黎易常乔贺龚"
)
GIVEN = "子文明华晓俊雨欣浩然思远嘉怡宇轩梦琪志强静涵婉清佳睿博凡诗雅泽晨立新海波丽芳永春秋月云峰凯瑶若彤亦辰逸航"
CLASSIC = "之甫翰渊卿居易维安道修轼游慎谦衡恪昭宗岳隐翊"
CITIES = W(
    "长沙 武汉 成都 杭州 南京 广州 厦门 青岛 郑州 西安 大连 昆明 南昌 合肥 "
    "保定 哈尔滨 长春 太原 桂林 贵阳 苏州 无锡 宁波 洛阳 扬州 绍兴"
)
PLACES = W(
    "湖南长沙 湖北武汉 四川成都 浙江杭州 江苏南京 广东广州 福建厦门 山东青岛 河南郑州 陕西西安 "
    "辽宁大连 云南昆明 江西南昌 安徽合肥 河北保定 黑龙江哈尔滨 吉林长春 山西太原 广西桂林 北京 上海 天津 重庆"
)
NATIONS = W("中国 美国 英国 法国 德国 日本 韩国 新加坡 加拿大 澳大利亚 意大利 西班牙 巴西 马来西亚")
ETHNIC = W("汉族 回族 满族 蒙古族 壮族 苗族 土家族 彝族 藏族 侗族")
SCHOOL_SUFFIX = W("大学 师范大学 理工大学 艺术学院 财经大学 医科大学 外国语学院 农业大学")
TITLE_A = W(
    "雾港 长夜 北城 追风 归途 星海 孤城 暗涌 春光 逆行 青山 白露 初雪 "
    "远方 烈火 长河 微光 旧梦 南风 海角 落日 晚晴 山海 少年 秋水 寒江"
)
FILM_B = W("往事 迷局 行动 来信 纪事 传奇 之约 密码 边缘 日记 回声 风暴")
SONG_B = W("谣 情歌 的夏天 不眠夜 小夜曲 之恋 回忆 远行 等你 独白 晚风")
ALBUM_B = W("集 时光 漫游 旅程 计划 拾遗 频率")
NOVEL_B = W("仙途 战神 至尊 剑歌 神尊 纪元 天下 狂澜 帝尊 录")
SHOW_B = W("大冒险 来了 好声音 向前冲 之夜 客栈 研究所 周末")
SITE_X = W("青云 墨香 星河 逐浪 九天 云起 书海 听雨")
SITE_Y = W("中文网 文学网 书院 小说网")
PRESS = W("文艺出版社 人民出版社 大学出版社 少年儿童出版社 古籍出版社")
CO_X = W("华信 瑞丰 东岳 鼎盛 恒远 星辰 博远 安达 金桥 汇通 天启 明泰 云帆 凯越 新航 启明")
CO_Y = W("科技 传媒 电子 生物 能源 物流 食品 文化 网络 汽车 影业 医药")
CO_Z = W("有限公司 股份有限公司 集团")
COUNTRY = W("阿尔多瓦 萨林加 维斯托利亚 卡莫兰 奥斯帕尼 塔尔维克 梅洛尼亚 伊兰多 贝萨里亚 诺维兰 科尔萨 埃德里亚")
CAPITAL = W("塞拉港 艾文城 洛桑德 米拉维 卡斯提 诺拉堡 贝尔克 托瓦尔 萨瓦纳 阿林湾")
CLIMATE = W("温带海洋性气候 热带雨林气候 亚热带季风气候 温带大陆性气候 地中海气候 热带草原气候")
DYNASTY = W("唐朝 宋朝 明朝 清朝 元朝 汉朝 北宋 南宋 东汉 西晋")
HAO_X = W("青松 竹溪 梅石 云泉 月溪 柳湾 兰亭 鹤山 霞谷 石湖 松风 半山")
HAO_Y = W("居士 山人 先生 道人 老人 散人")
SPOT_X = W("云雾 青龙 白云 玉屏 天柱 紫霞 翠微 凤凰 九龙 金顶 卧牛 仙女")
SPOT_Y = W("山 峰 岭")
# Insect body -> taxonomic order, so the "目" triplet stays biologically plausible.
INSECT = {
    "天牛": "鞘翅目",
    "叶甲": "鞘翅目",
    "瓢虫": "鞘翅目",
    "尺蛾": "鳞翅目",
    "夜蛾": "鳞翅目",
    "螟": "鳞翅目",
    "网蝽": "半翅目",
    "蚜": "半翅目",
    "粉虱": "半翅目",
    "蝗": "直翅目",
    "食蚜蝇": "双翅目",
}
HOSTS = W("茶树 桑 柑橘 松 竹 稻 棉 玉米 苹果 梨 油菜 花椒")
